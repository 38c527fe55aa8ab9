"""HTTP surface of `$analyze` (operations/OperationDefinition-analyze.json).

- `POST /fhir/ImagingStudy/{id}/$analyze` (body optional: Parameters with `model`, `series`):
  200 + DiagnosticReport, or with `Prefer: respond-async` 202 + Content-Location of the job.
- `GET /fhir/$analyze-jobs/{task id}`: 202 with X-Progress and Retry-After while running; then
  200 with a `batch-response` Bundle holding the DiagnosticReport (the completion shape of the
  FHIR asynchronous interaction pattern, async-bundle.html), or the job's OperationOutcome.
- `DELETE /fhir/$analyze-jobs/{task id}`: cancel (202).
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from fhir_facade.analyze.jobs import AnalysisJobs
from fhir_facade.fhir.errors import FhirError, bad_request
from fhir_facade.fhir.negotiation import negotiate_response_format
from fhir_facade.fhir.openapi import error_responses
from fhir_facade.fhir.pipeline import Origin, enter_origin
from fhir_facade.fhir.prefer import prefers_async
from fhir_facade.fhir.request_body import read_resource
from fhir_facade.fhir.responses import fhir_response

__all__ = ["JOBS_PATH", "build_analyze_router"]

JOBS_PATH = "$analyze-jobs"
_KEY = re.compile(r"^[\x21-\x7e]{1,128}$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_JSON: dict[str, dict[str, Any]] = {"application/fhir+json": {}}


def _parameters(body: dict[str, Any]) -> tuple[str | None, str | None]:
    """`model` and `series` from a Parameters resource; unknown parameters are a 400."""
    if body.get("resourceType") != "Parameters":
        raise bad_request("The body of $analyze must be a Parameters resource", expression="resourceType")
    model = series = None
    for index, parameter in enumerate(body.get("parameter", [])):
        name = parameter.get("name")
        value = next((v for k, v in parameter.items() if k.startswith("value")), None)
        where = f"Parameters.parameter[{index}]"
        if name == "model" and isinstance(value, str):
            model = value
        elif name == "series" and isinstance(value, str) and _UID.match(value):
            series = value
        elif name in ("model", "series"):
            raise bad_request(
                f"Parameter {name!r} needs a valid {'code' if name == 'model' else 'UID'}", expression=where
            )
        else:
            raise bad_request(
                f"$analyze has no parameter {name!r} (it takes model, series)", expression=where
            )
    return model, series


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    key = key.strip().strip('"')
    if not _KEY.match(key):
        raise bad_request("Idempotency-Key must be 1-128 visible ASCII characters")
    return key


async def _as_operation() -> None:
    """What the routes below read and write is done by the `$analyze` operation (pipeline origin)."""
    enter_origin(Origin.OPERATION)


def build_analyze_router(jobs: AnalysisJobs, base_url: str) -> APIRouter:
    router = APIRouter(prefix="/fhir", dependencies=[Depends(_as_operation)])

    def status_url(task_id: str) -> str:
        return f"{base_url}/{JOBS_PATH}/{task_id}"

    @router.post(
        "/ImagingStudy/{study_id}/$analyze",
        summary="Analyze the study with an AI model (operations/OperationDefinition-analyze.json)",
        openapi_extra={"requestBody": {"required": False, "content": _JSON}},
        responses={
            200: {"content": _JSON},
            202: {"description": "accepted (Prefer: respond-async)"},
            **error_responses(404, 409, 422),
        },
    )
    async def analyze(request: Request, study_id: str) -> Response:
        negotiate_response_format(request)
        model = series = None
        if await request.body():
            model, series = _parameters(await read_resource(request))
        task_id, job, report = await jobs.submit(
            study_id, model_id=model, series_uid=series, idempotency_key=_idempotency_key(request)
        )
        headers = {"X-Analysis-Task": f"Task/{task_id}"}
        if prefers_async(request):
            return Response(status_code=202, headers={**headers, "Content-Location": status_url(task_id)})
        if report is None and job is not None:
            try:
                report = await jobs.wait(job)
            except FhirError as error:  # the failed job is a Task too: say which
                raise FhirError(error.status, error.issues, {**error.headers, **headers}) from error
        if report is None:  # a retry of a job that runs elsewhere: poll it
            return Response(status_code=202, headers={**headers, "Content-Location": status_url(task_id)})
        return fhir_response(report, request, headers=headers)

    @router.get(
        f"/{JOBS_PATH}/{{task_id}}",
        summary="Status of an asynchronous $analyze",
        responses={
            200: {"content": _JSON},
            202: {"description": "still running"},
            **error_responses(404, 422),
        },
    )
    async def job_status(request: Request, task_id: str) -> Response:
        negotiate_response_format(request)
        state = await jobs.state(task_id)
        if state.running:
            return Response(status_code=202, headers={"X-Progress": state.progress, "Retry-After": "2"})
        if state.error is not None:
            raise state.error
        assert state.report is not None
        bundle = {
            "resourceType": "Bundle",
            "type": "batch-response",
            "entry": [
                {
                    "fullUrl": f"{base_url}/DiagnosticReport/{state.report['id']}",
                    "resource": state.report,
                    "response": {
                        "status": "200 OK",
                        "location": f"DiagnosticReport/{state.report['id']}",
                    },
                }
            ],
        }
        return fhir_response(bundle, request)

    @router.delete(
        f"/{JOBS_PATH}/{{task_id}}",
        summary="Cancel an asynchronous $analyze",
        status_code=202,
        responses=error_responses(404, 409),
    )
    async def cancel(request: Request, task_id: str) -> Response:
        await jobs.cancel(task_id)
        return Response(status_code=202)

    return router
