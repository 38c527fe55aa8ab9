"""HTTP surface of `$deidentify`: `POST /fhir/ImagingStudy/{id}/$deidentify` with a Parameters body
(`destination`, `option`*), answered 200 with the output Parameters (ADR 0040)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from fhir_facade.fhir.negotiation import negotiate_response_format
from fhir_facade.fhir.openapi import error_responses
from fhir_facade.fhir.pipeline import Origin, enter_origin
from fhir_facade.fhir.request_body import read_resource
from fhir_facade.fhir.responses import fhir_response
from fhir_facade.intake.deidentify import Deidentifier, parse_request

__all__ = ["build_deidentify_router"]

_JSON: dict[str, dict[str, Any]] = {"application/fhir+json": {}}


async def _as_operation() -> None:
    """What the route reads and writes is done by the `$deidentify` operation (pipeline origin)."""
    enter_origin(Origin.OPERATION)


def build_deidentify_router(deidentifier: Deidentifier) -> APIRouter:
    router = APIRouter(prefix="/fhir", dependencies=[Depends(_as_operation)])

    @router.post(
        "/ImagingStudy/{study_id}/$deidentify",
        summary="De-identify the study to a configured DICOMweb store (OperationDefinition-deidentify.json)",
        openapi_extra={"requestBody": {"required": True, "content": _JSON}},
        responses={200: {"content": _JSON}, **error_responses(400, 403, 404, 422)},
    )
    async def deidentify(request: Request, study_id: str) -> Response:
        negotiate_response_format(request)
        body = await read_resource(request) if await request.body() else None
        result = await deidentifier.run(study_id, parse_request(body))
        return fhir_response(result, request)

    return router
