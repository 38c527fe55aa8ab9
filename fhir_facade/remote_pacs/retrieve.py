"""Retrieve jobs: a study moved from a remote node into the local PACS, followed as a Task (ADR 0041).

`$retrieve-remote` finds the study on the node through the authorizing remote search (a confined
caller can only retrieve its patients' studies), writes a Task (code retrieve, `for` the study's
patient) through the authorizing Task provider, and starts a C-MOVE job in Orthanc. A monitor then
follows the Orthanc job and the instances arriving locally, and updates the Task's businessStatus
("12 of 30 instances (40%)") until it is completed (output -> the local ImagingStudy) or failed.
The monitor writes as the server (origin INTERNAL, no caller), through the pipeline, so audit and
Subscriptions see every update. Once the study is stable in Orthanc the arrival watcher sees it
like any other arrival (arrival Task, analysis).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from dataclasses import dataclass
from typing import Any

from fhir_facade.analyze.codes import TASK_CODE_SYSTEM
from fhir_facade.dicomweb.errors import DicomwebError
from fhir_facade.embedded.remote_nodes import RemoteNode
from fhir_facade.fhir.errors import error, not_found
from fhir_facade.fhir.pipeline import Origin, origin_scope
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.remote_pacs.orthanc_dimse import OrthancDimse

__all__ = ["ORTHANC_JOB_SYSTEM", "RETRIEVE_CODE", "RetrieveJobs", "RetrieveState"]

log = logging.getLogger(__name__)

RETRIEVE_CODE = {
    "system": TASK_CODE_SYSTEM,
    "code": "retrieve",
    "display": "Retrieve imaging study from a remote node",
}
#: Task.identifier.system of the Orthanc job that runs the C-MOVE.
ORTHANC_JOB_SYSTEM = "http://fhir-facade.org/fhir/sid/orthanc-job"
_FINAL_FAILURES = {"Failure"}
_UID_SYSTEM = "urn:dicom:uid"


@dataclass(frozen=True)
class RetrieveState:
    """A status poll's answer: running (progress text), done (the local study id) or failed."""

    running: bool
    progress: str = ""
    study_uid: str | None = None
    failure: str | None = None


def _concept(text: str) -> dict[str, Any]:
    return {"text": text}


def _input(task: dict[str, Any], name: str) -> dict[str, Any]:
    return next((i for i in task.get("input", []) if i.get("type", {}).get("text") == name), {})


class RetrieveJobs:
    """Starts retrieves, follows them to their end, and answers status polls."""

    def __init__(
        self,
        dimse: OrthancDimse,
        tasks: ResourceProvider,
        *,
        local_aet: str,
        poll_interval: float = 0.5,
        timeout: float = 3600.0,
    ) -> None:
        """`tasks`: the pipelined Task provider (the caller's rights on requests, the server's in
        monitors). `local_aet`: the AE title of the local Orthanc, the C-MOVE destination."""
        self._dimse = dimse
        self._tasks = tasks
        self._local_aet = local_aet
        self._poll = poll_interval
        self._timeout = timeout
        self._monitors: set[asyncio.Task[None]] = set()

    async def start(self, node: RemoteNode, study: dict[str, Any], study_uid: str) -> str:
        """Write the Task (as the caller) and start the C-MOVE; the Task id."""
        expected = study.get("numberOfInstances")
        task: dict[str, Any] = {
            "resourceType": "Task",
            "status": "in-progress",
            "intent": "order",
            "code": {"coding": [dict(RETRIEVE_CODE)], "text": RETRIEVE_CODE["display"]},
            "description": f"Retrieve study {study_uid} from {node.name} into the local PACS",
            "for": study["subject"],
            "businessStatus": _concept("requested"),
            "input": [
                {
                    "type": _concept("node"),
                    "valueReference": {"reference": f"Endpoint/{node.endpoint_id}", "display": node.name},
                },
                {
                    "type": _concept("study"),
                    "valueIdentifier": {"system": _UID_SYSTEM, "value": f"urn:oid:{study_uid}"},
                },
            ],
        }
        if isinstance(expected, int):
            task["input"].append({"type": _concept("expected-instances"), "valueInteger": expected})
        created = await self._tasks.create(task)
        task_id = str(created["id"])
        try:
            job_id = await self._dimse.move_study(node.name, study_uid, self._local_aet)
        except DicomwebError as exc:
            # Written as the server (a fresh context: no caller), as the monitor would.
            await asyncio.create_task(
                self._finish(created, "failed", f"C-MOVE refused: {exc}"), context=contextvars.Context()
            )
            raise
        # The monitor runs as the server, not as the caller: a fresh context (no Access).
        monitor = asyncio.create_task(
            self._follow(task_id, job_id, study_uid, expected if isinstance(expected, int) else None),
            name=f"retrieve-{task_id}",
            context=contextvars.Context(),
        )
        self._monitors.add(monitor)
        monitor.add_done_callback(self._monitors.discard)
        return task_id

    async def stop(self) -> None:
        for monitor in list(self._monitors):
            monitor.cancel()
        await asyncio.gather(*self._monitors, return_exceptions=True)

    async def _follow(self, task_id: str, job_id: str, study_uid: str, expected: int | None) -> None:
        with origin_scope(Origin.INTERNAL):
            try:
                await asyncio.wait_for(self._follow_job(task_id, job_id, study_uid, expected), self._timeout)
            except TimeoutError:
                await self._finish(await self._tasks.read(task_id), "failed", "Retrieve timed out")
            except Exception:  # a monitor must not die silently: the Task says it failed
                log.exception("Retrieve Task/%s failed", task_id)
                await self._finish(await self._tasks.read(task_id), "failed", "Retrieve failed; see the log")

    async def _follow_job(self, task_id: str, job_id: str, study_uid: str, expected: int | None) -> None:
        last = ""
        first = True  # the first update records the Orthanc job id
        while True:
            job = await self._dimse.job(job_id) or {}
            state = str(job.get("State", "Unknown"))
            arrived = await self._dimse.local_instance_count(study_uid)
            progress = _progress_text(arrived, expected, state, int(job.get("Progress", 0) or 0))
            task = await self._tasks.read(task_id)
            if first:
                task["identifier"] = [{"system": ORTHANC_JOB_SYSTEM, "value": job_id}]
                first = False
            if state == "Success":
                task["output"] = [
                    {"type": _concept("study"), "valueReference": {"reference": f"ImagingStudy/{study_uid}"}}
                ]
                await self._finish(task, "completed", progress)
                return
            if state in _FINAL_FAILURES:
                reason = str(job.get("ErrorDescription") or job.get("ErrorCode") or "C-MOVE failed")
                await self._finish(task, "failed", f"{progress}; {reason}")
                return
            if progress != last:
                task["businessStatus"] = _concept(progress)
                await self._tasks.update(task_id, task, if_match=None)
                last = progress
            await asyncio.sleep(self._poll)

    async def _finish(self, task: dict[str, Any], status: str, text: str) -> None:
        task = {**task, "status": status, "businessStatus": _concept(text)}
        if status == "failed":
            task["statusReason"] = _concept(text)
        with origin_scope(Origin.INTERNAL):
            await self._tasks.update(str(task["id"]), task, if_match=None)

    async def state(self, task_id: str) -> RetrieveState:
        """The Task, read with the caller's rights (another patient's job is a 404 to a confined one)."""
        task = await self._tasks.read(task_id)
        codes = {(c.get("system"), c.get("code")) for c in task.get("code", {}).get("coding", [])}
        if (RETRIEVE_CODE["system"], RETRIEVE_CODE["code"]) not in codes:
            raise not_found(f"No retrieve job {task_id}")
        text = str(task.get("businessStatus", {}).get("text", ""))
        status = task.get("status")
        if status == "completed":
            reference = task["output"][0]["valueReference"]["reference"]
            return RetrieveState(False, text, study_uid=reference.split("/", 1)[1])
        if status in ("failed", "cancelled", "entered-in-error"):
            return RetrieveState(False, text, failure=text or str(status))
        return RetrieveState(True, text)


def _progress_text(arrived: int, expected: int | None, state: str, percent: int) -> str:
    if expected:
        share = min(100, round(100 * arrived / expected))
        return f"{arrived} of {expected} instances in the local PACS ({share}%)"
    return f"{arrived} instances in the local PACS; C-MOVE {state.lower()} ({percent}%)"


def retrieve_failed(diagnostics: str) -> Any:
    """502: the remote node or Orthanc did not complete the retrieve."""
    return error(502, "exception", diagnostics)
