"""HTTP surface of `$import` (operations/OperationDefinition-import.json, ADR 0038).

- `POST /fhir/ImagingStudy/$import[?patient=Patient/id | ?patient-identifier=system|value]
  [&order=ServiceRequest/id]` with a DICOM file, a STOW-RS multipart/related body or a zip:
  200 + Parameters (one `instance` per entry, one `study` per study), or with
  `Prefer: respond-async` 202 + Content-Location of the job.
- `GET /fhir/$import-jobs/{task id}`: 202 with X-Progress and Retry-After while it runs, then 200
  with the Parameters (kept in the job's Task, so any replica answers).

Rights (ADR 0009): an import writes images, so it needs create on ImagingStudy. A caller confined
to patients must name the Patient, one of its own (read through the authorizing provider: another
patient's is a 404), and the order is read the same way and must be that patient's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import shutil
import tempfile
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from fhir_facade.analyze.codes import TASK_CODE_SYSTEM
from fhir_facade.auth.access import authenticated_caller
from fhir_facade.auth.errors import forbidden
from fhir_facade.auth.scopes import Interaction
from fhir_facade.config import Settings
from fhir_facade.dicom_to_fhir.context import MappingContext
from fhir_facade.dicom_to_fhir.patient import patient_resource_id
from fhir_facade.fhir.errors import FhirError, bad_request, not_found, unprocessable
from fhir_facade.fhir.openapi import error_responses
from fhir_facade.fhir.pipeline import Origin, PipelinedProvider, enter_origin
from fhir_facade.fhir.prefer import prefers_async
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.responses import fhir_response
from fhir_facade.intake.coercion import IdentityTarget
from fhir_facade.intake.identity import IdentityNotDerivable, identity_from_fhir, identity_from_identifier
from fhir_facade.intake.import_ledger import ImportLedger
from fhir_facade.intake.import_pacs import OrthancStore
from fhir_facade.intake.import_run import ImportOptions, report_parameters, run_import
from fhir_facade.intake.import_sources import body_kind, spool_body
from fhir_facade.intake.validation import warm_up

__all__ = ["IMPORT_OPERATION", "JOBS_PATH", "ImportService"]

log = logging.getLogger(__name__)

JOBS_PATH = "$import-jobs"
IMPORT_OPERATION = {"name": "import", "definition": "http://fhir-facade.org/fhir/OperationDefinition/import"}
_IMPORT_CODE = {"system": TASK_CODE_SYSTEM, "code": "import", "display": "Import DICOM instances"}
_JSON: dict[str, dict[str, Any]] = {"application/fhir+json": {}}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_BODIES: dict[str, dict[str, Any]] = {
    "application/dicom": _BINARY,
    "multipart/related": _BINARY,
    "application/zip": _BINARY,
}


async def _as_operation() -> None:
    enter_origin(Origin.OPERATION)


def _reference_id(value: str, resource_type: str, parameter: str) -> str:
    prefix = f"{resource_type}/"
    if not value.startswith(prefix) or not value[len(prefix) :]:
        raise bad_request(f"{parameter} must be a reference {prefix}<id>", expression=parameter)
    return value[len(prefix) :]


class ImportService:
    """Resolves the caller's Patient and order, runs imports in a worker thread, keeps their jobs."""

    def __init__(
        self,
        settings: Settings,
        engine: Any,
        visible: Mapping[str, PipelinedProvider],
        tasks: ResourceProvider,
        ctx: MappingContext,
    ) -> None:
        if not settings.orthanc_url:
            raise ValueError(
                "$import needs FACADE_ORTHANC_URL (it stores and deletes through Orthanc's REST API)"
            )
        self._settings = settings
        self._ledger = ImportLedger(engine)
        self._visible = visible
        self._tasks = tasks
        self._ctx = ctx
        self._progress: dict[str, str] = {}
        self._jobs: set[asyncio.Task[None]] = set()
        self._store = OrthancStore(
            settings.orthanc_url,
            timeout=max(settings.dicomweb_timeout, 60.0),
            connections=settings.imports.store_concurrency,
            auth=settings.pacs_auth,
        )
        self.operations: dict[str, list[dict[str, str]]] = {"ImagingStudy": [IMPORT_OPERATION]}
        threading.Thread(target=warm_up, name="import-validation-tables", daemon=True).start()
        self.router = self._build_router()

    async def close(self) -> None:
        for job in list(self._jobs):
            job.cancel()
        for job in list(self._jobs):
            with contextlib.suppress(BaseException):
                await job
        self._store.close()

    # -- who and what ---------------------------------------------------------------------------

    async def _identity(self, request: Request) -> tuple[IdentityTarget | None, str | None, str]:
        """The identity to coerce to, the Patient reference (for the job's Task) and the source."""
        access = authenticated_caller()
        access.require(Interaction.CREATE, "ImagingStudy")
        confined = access.confinement(Interaction.CREATE, "ImagingStudy")
        query = request.query_params
        unknown = set(query) - {"patient", "patient-identifier", "order"}
        if unknown:
            raise bad_request(
                f"$import has no parameter {sorted(unknown)[0]!r}", expression=sorted(unknown)[0]
            )
        patient_ref, identifier, order_ref = (
            query.get("patient"),
            query.get("patient-identifier"),
            query.get("order"),
        )
        if patient_ref and identifier:
            raise bad_request("Name the Patient once: patient or patient-identifier", expression="patient")
        if confined is not None and not (patient_ref or identifier):
            raise forbidden("A caller confined to patients imports only for a Patient it names (patient=)")
        patient: dict[str, Any] | None = None
        source = "import"
        if patient_ref:
            patient_id = _reference_id(patient_ref, "Patient", "patient")
            patient = await self._visible["Patient"].read(patient_id)  # 404 for another's patient
            source = patient_ref
        elif identifier:
            system, _, value = identifier.partition("|")
            mrn = {"system": system, "value": value}
            try:
                dicom_id, issuer = identity_from_identifier(mrn, self._ctx, expression="patient-identifier")
            except IdentityNotDerivable as error:
                raise unprocessable(str(error), detail_code="identity_not_derivable") from error
            patient_id = patient_resource_id(dicom_id, issuer or None) or ""
            if confined is not None and patient_id not in confined:
                raise not_found(f"Patient with identifier {identifier} is not known")
            patient = {"resourceType": "Patient", "id": patient_id, "identifier": [mrn]}
            patient_ref = f"Patient/{patient_id}" if patient_id else None
            source = identifier
        order: dict[str, Any] | None = None
        if order_ref:
            if patient is None:
                raise bad_request(
                    "An order is reconciled with the Patient it is for: name it too", expression="order"
                )
            order = await self._visible["ServiceRequest"].read(
                _reference_id(order_ref, "ServiceRequest", "order")
            )
            subject = (order.get("subject") or {}).get("reference")
            if subject and patient_ref and subject != patient_ref:
                raise unprocessable(
                    f"{order_ref} is for {subject}, not {patient_ref}", detail_code="identity_not_derivable"
                )
        if patient is None:
            return None, None, source
        try:
            target = identity_from_fhir(patient, order, self._ctx)
        except IdentityNotDerivable as error:
            raise unprocessable(str(error), detail_code="identity_not_derivable") from error
        return target, patient_ref, source

    def _options(self, target: IdentityTarget | None, source: str) -> ImportOptions:
        return ImportOptions(
            target=target,
            modifying_system="fhir-facade $import",
            source_of_previous_values=source,
            dciodvfy=self._settings.imports.dciodvfy,
            concurrency=self._settings.imports.store_concurrency,
        )

    # -- running ----------------------------------------------------------------------------------

    async def _run(
        self, request: Request | _Received, options: ImportOptions, progress_key: str
    ) -> dict[str, Any]:
        workdir = Path(tempfile.mkdtemp(prefix="facade-import-"))
        try:
            kind, body = await spool_body(request.stream(), request.headers.get("content-type", ""), workdir)

            def progress(text: str) -> None:
                self._progress[progress_key] = text

            report = await asyncio.to_thread(
                run_import, kind, body, workdir, options, self._store, self._ledger, progress
            )
            return report_parameters(report)
        finally:
            self._progress.pop(progress_key, None)
            await asyncio.to_thread(shutil.rmtree, workdir, True)

    async def _job(
        self, task: dict[str, Any], request: _Received, options: ImportOptions, body_read: asyncio.Event
    ) -> None:
        enter_origin(Origin.INTERNAL)
        try:
            result = await self._run(request, options, task["id"])
            data = base64.b64encode(json.dumps(result).encode()).decode()
            summary = {p["name"]: p["valueInteger"] for p in result["parameter"][0]["part"]}
            task = {
                **task,
                "status": "completed",
                "output": [
                    {
                        "type": {"text": "result"},
                        "valueAttachment": {"contentType": "application/fhir+json", "data": data},
                    },
                    *({"type": {"text": name}, "valueInteger": count} for name, count in summary.items()),
                ],
            }
        except asyncio.CancelledError:
            task = {**task, "status": "cancelled"}
        except FhirError as error:
            task = {**task, "status": "failed", "statusReason": {"text": str(error.issues[0].diagnostics)}}
        except Exception as error:
            log.exception("Import %s failed", task["id"])
            task = {**task, "status": "failed", "statusReason": {"text": f"{type(error).__name__}"}}
        finally:
            body_read.set()  # a job that failed before reading the whole body releases the request
        task.pop("meta", None)
        await self._tasks.update(task["id"], task, if_match=None)

    # -- routes -----------------------------------------------------------------------------------

    def _build_router(self) -> APIRouter:
        router = APIRouter(prefix="/fhir", dependencies=[Depends(_as_operation)])
        base_url = self._settings.base_url

        @router.post(
            "/ImagingStudy/$import",
            summary="Import DICOM instances (operations/OperationDefinition-import.json)",
            openapi_extra={"requestBody": {"required": True, "content": _BODIES}},
            responses={
                200: {"content": _JSON},
                202: {"description": "accepted (Prefer: respond-async)"},
                **error_responses(400, 403, 404, 413, 415, 422),
            },
        )
        async def import_instances(request: Request) -> Response:
            body_kind(request.headers.get("content-type", ""))  # 415 before anything is done
            target, patient_ref, source = await self._identity(request)
            options = self._options(target, source)
            if not prefers_async(request):
                return fhir_response(await self._run(request, options, uuid.uuid4().hex), request)
            task: dict[str, Any] = {
                "resourceType": "Task",
                "id": uuid.uuid4().hex,
                "status": "in-progress",
                "intent": "order",
                "code": {"coding": [_IMPORT_CODE]},
                "description": "Import DICOM instances ($import)",
            }
            if patient_ref:
                task["for"] = {"reference": patient_ref}
            task = (await self._tasks.update(task["id"], task, if_match=None)).resource
            self._progress[task["id"]] = "receiving the upload"
            # The body is read by the job: the 202 goes out when the upload is spooled to disk.
            body_read = asyncio.Event()
            job = asyncio.create_task(self._job(task, _Received(request, body_read), options, body_read))
            self._jobs.add(job)
            job.add_done_callback(self._jobs.discard)
            await body_read.wait()
            return Response(
                status_code=202,
                headers={
                    "Content-Location": f"{base_url}/{JOBS_PATH}/{task['id']}",
                    "X-Import-Task": f"Task/{task['id']}",
                },
            )

        @router.get(
            f"/{JOBS_PATH}/{{task_id}}",
            summary="Status of an asynchronous $import",
            responses={
                200: {"content": _JSON},
                202: {"description": "still running"},
                **error_responses(404),
            },
        )
        async def job_status(request: Request, task_id: str) -> Response:
            access = authenticated_caller()
            access.require(Interaction.READ, "ImagingStudy")
            confined = access.confinement(Interaction.READ, "ImagingStudy")
            try:
                task = await self._tasks.read(task_id)
            except FhirError as error:
                raise not_found(f"No import job {task_id}") from error
            codes = task.get("code", {}).get("coding", [])
            patient = (task.get("for") or {}).get("reference", "").removeprefix("Patient/")
            if not any(c.get("code") == "import" for c in codes) or (
                confined is not None and patient not in confined
            ):
                raise not_found(f"No import job {task_id}")
            if task["status"] == "in-progress":
                progress = self._progress.get(task_id, "running")
                return Response(status_code=202, headers={"X-Progress": progress, "Retry-After": "1"})
            if task["status"] != "completed":
                reason = (task.get("statusReason") or {}).get("text") or f"Import {task['status']}"
                raise unprocessable(reason, detail_code="invalid_request")
            attachment = task["output"][0]["valueAttachment"]["data"]
            return fhir_response(json.loads(base64.b64decode(attachment)), request)

        return router


class _Received:
    """The request as the job reads it: its stream, and an event set once the body is all read."""

    def __init__(self, request: Request, done: asyncio.Event) -> None:
        self._request = request
        self._done = done
        self.headers = request.headers

    async def stream(self) -> Any:
        try:
            async for chunk in self._request.stream():
                yield chunk
        finally:
            self._done.set()
