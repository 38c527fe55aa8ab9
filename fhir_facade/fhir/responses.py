"""FHIR responses and the one place where errors become OperationOutcome responses."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from fhir_facade.dicomweb import DicomwebError, DicomwebUnavailable
from fhir_facade.fhir.errors import FhirError, Issue, dicom_service_unavailable, internal_error
from fhir_facade.fhir.negotiation import FHIR_JSON, wants_pretty

__all__ = ["fhir_response", "install_error_handlers"]

log = logging.getLogger(__name__)


def fhir_response(
    body: dict[str, Any],
    request: Request | None = None,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    """Serialise a resource as `application/fhir+json` (indented with `_pretty=true`)."""
    pretty = request is not None and wants_pretty(request)
    content = json.dumps(
        body,
        ensure_ascii=False,
        indent=2 if pretty else None,
        separators=None if pretty else (",", ":"),
    )
    return Response(
        content.encode("utf-8"),
        status_code=status,
        media_type=f"{FHIR_JSON}; charset=utf-8",
        headers=headers,
    )


def _error_response(error: FhirError, request: Request) -> Response:
    return fhir_response(error.operation_outcome(), request, status=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Map every failure to an OperationOutcome with the right status; never a stack trace."""

    @app.exception_handler(FhirError)
    async def _fhir_error(request: Request, exc: FhirError) -> Response:
        if exc.status >= 500:
            log.warning("%s %s -> %s: %s", request.method, request.url.path, exc.status, exc)
        return _error_response(exc, request)

    @app.exception_handler(DicomwebError)
    async def _pacs_error(request: Request, exc: DicomwebError) -> Response:
        # Unavailable (transport, timeout, 5xx) is the client's "retry later"; any other PACS
        # failure is a bad gateway: the request was fine, the PACS answer was not.
        log.warning("PACS error on %s %s: %s", request.method, request.url.path, exc)
        if isinstance(exc, DicomwebUnavailable):
            return _error_response(dicom_service_unavailable(str(exc)), request)
        error = FhirError(502, [Issue("exception", str(exc), detail_code="dicom_service_error")])
        return _error_response(error, request)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        issues = [
            Issue(
                "invalid",
                f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}",
                expression=tuple(str(err["loc"][-1]) for _ in [0] if err.get("loc")),
            )
            for err in exc.errors()
        ] or [Issue("invalid", "Invalid request")]
        return _error_response(FhirError(400, issues), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "processing")
        detail = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        if exc.status_code == 404:
            detail = f"No FHIR interaction at {request.method} {request.url.path}"
        error = FhirError(exc.status_code, [Issue(code, detail)], dict(exc.headers or {}))
        return _error_response(error, request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("Unhandled error on %s %s", request.method, request.url.path)
        return _error_response(internal_error(), request)
