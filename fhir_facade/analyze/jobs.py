"""Analysis jobs: every `$analyze` run is a Task of the worklist, and requested analysis Tasks in the
worklist are run by the same worker.

- A request creates a Task (code analyze, focus the study, status in-progress) and runs the
  analysis as an asyncio job; the finished Task (completed, output -> DiagnosticReport) is stored in
  the result's transaction; a failure sets it `failed` with the OperationOutcome's code as
  statusReason. Synchronous requests wait for the job; `Prefer: respond-async` gets its status URL.
- `Idempotency-Key` is kept as Task.identifier: a retry finds the Task and returns its report (or
  joins the running job) instead of running the model again. Keys are serialised per process; two
  replicas racing on one key can both run (documented in ADR 0006).
- The worklist poller claims `Task?status=requested&code=analyze` (oldest, most urgent first) by
  moving it to in-progress with If-Match, so two workers never take the same Task. It runs the Task
  with the rights of whoever wrote its `requested` version (the store keeps that principal with the
  version), checked when it runs: the same checks as `$analyze` itself, through the authorizing
  providers, so a Task cannot point the worker at a study or order its author may not see.
- Results are read through the authorizing providers with the poller's rights, so a job Task whose
  output names another patient's report hands out nothing (ADR 0009).
- An Idempotency-Key belongs to the client and user that used it: another caller's Task with the
  same key is not theirs to find (and its study is not named to them).
- At most `analyze_workers` analyses run at once; the rest wait their turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fhir_facade.analyze.codes import ANALYZE_CODE, TASK_CODE_SYSTEM
from fhir_facade.analyze.service import AnalysisOutcome, Analyzer
from fhir_facade.analyze.task_narrative import with_analysis_task_narrative
from fhir_facade.auth.access import Access, acting_as, current_access
from fhir_facade.auth.enforcement import AuthorizationStage
from fhir_facade.auth.operations import check_analysis_rights
from fhir_facade.auth.scopes import Interaction
from fhir_facade.correlation import correlation_scope
from fhir_facade.fhir.errors import FACADE_ISSUE_SYSTEM, FhirError, Issue, conflict, internal_error, not_found
from fhir_facade.fhir.internal_search import SearchBuilder
from fhir_facade.fhir.pipeline import Origin, PipelinedProvider, enter_origin
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.references import local_target
from fhir_facade.resources.stored import StoredResourceProvider

__all__ = ["IDEMPOTENCY_KEY_SYSTEM", "AnalysisJob", "AnalysisJobs", "JobState"]

log = logging.getLogger(__name__)

#: Task.identifier.system of a client's Idempotency-Key.
IDEMPOTENCY_KEY_SYSTEM = "http://fhir-facade.org/fhir/sid/idempotency-key"

#: facade-issue code -> HTTP status, to answer a failed job's poll with the status it failed with.
_STATUS_BY_DETAIL = {
    "no_applicable_images": 422,
    "image_decode_error": 422,
    "dicom_service_unavailable": 503,
    "dicom_service_error": 502,
    "ai_inference_unavailable": 503,
    "ai_inference_timeout": 504,
    "fhir_mapping_error": 500,
    "unknown_model": 400,
}


@dataclass
class AnalysisJob:
    """An analysis running in this process."""

    task_id: str
    study_id: str
    model_id: str | None
    series_uid: str | None
    study: dict[str, Any] | None = field(default=None, repr=False)
    done: int = 0
    total: int = 0
    runner: asyncio.Task[AnalysisOutcome] | None = field(default=None, repr=False)

    def progress(self, done: int, total: int) -> None:
        self.done, self.total = done, total

    @property
    def progress_text(self) -> str:
        if not self.total:
            return "selecting images"
        return f"{self.done} of {self.total} images analysed"


@dataclass(frozen=True)
class JobState:
    """What a status poll answers: running (with progress), a report, or an error."""

    running: bool
    progress: str = ""
    report: dict[str, Any] | None = None
    error: FhirError | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AnalysisJobs:
    """Creates, runs, finds and cancels analysis jobs (Tasks)."""

    def __init__(
        self,
        analyzer: Analyzer,
        tasks: StoredResourceProvider,
        visible: Mapping[str, PipelinedProvider],
        authorization: AuthorizationStage,
        *,
        workers: int,
        base_url: str,
    ) -> None:
        """`tasks`: the store's Task provider (job Tasks are the server's records). `visible`: the
        pipelined providers, through which everything is read that a caller is handed or that the
        worklist acts on for a client; `authorization`: the pipeline's authorization stage, for the
        checks a job makes before it acts."""
        self.analyzer = analyzer
        self._tasks = tasks
        self._visible = visible
        self._authorization = authorization
        self._reports = visible["DiagnosticReport"]
        self._studies = visible["ImagingStudy"]
        self._base_url = base_url
        self._slots = asyncio.Semaphore(workers)
        self._workers = workers
        self._running: dict[str, AnalysisJob] = {}
        self._key_locks: dict[str, tuple[asyncio.Lock, int]] = {}  # key -> (lock, requests using it)

    # -- starting jobs --------------------------------------------------------------------------

    async def submit(
        self,
        study_id: str,
        *,
        model_id: str | None,
        series_uid: str | None,
        idempotency_key: str | None,
    ) -> tuple[str, AnalysisJob | None, dict[str, Any] | None]:
        """Start (or find) the job for this request: (task id, running job, finished report)."""
        self.analyzer.manifest(model_id)  # 400 for an unknown model, before anything is written
        study = await self._studies.read(study_id)  # 404 for an unknown study
        if idempotency_key is None:
            job = await self._start(study, model_id, series_uid, None)
            return job.task_id, job, None
        # One lock per key in flight (not per key ever seen): it goes when its last user leaves.
        lock, users = self._key_locks.get(idempotency_key, (asyncio.Lock(), 0))
        self._key_locks[idempotency_key] = (lock, users + 1)
        try:
            async with lock:
                return await self._submit_keyed(study, study_id, model_id, series_uid, idempotency_key)
        finally:
            lock, users = self._key_locks[idempotency_key]
            if users == 1:
                del self._key_locks[idempotency_key]
            else:
                self._key_locks[idempotency_key] = (lock, users - 1)

    async def _submit_keyed(
        self,
        study: dict[str, Any],
        study_id: str,
        model_id: str | None,
        series_uid: str | None,
        idempotency_key: str,
    ) -> tuple[str, AnalysisJob | None, dict[str, Any] | None]:
        """Inside the key's lock: the same report, the running job, or a new one."""
        existing = await self._task_for_key(idempotency_key)
        if existing is not None:
            focus = existing.get("focus", {}).get("reference")
            if focus != f"ImagingStudy/{study_id}":
                raise conflict(
                    f"Idempotency-Key {idempotency_key!r} was used for {focus}, not ImagingStudy/{study_id}"
                )
            state = await self.state(existing["id"], own=True)
            if state.running or state.report is not None:
                return existing["id"], self._running.get(existing["id"]), state.report
        job = await self._start(study, model_id, series_uid, idempotency_key)
        return job.task_id, job, None

    async def _task_for_key(self, key: str) -> dict[str, Any] | None:
        """The newest Task carrying this key, created by this caller, that is not failed or cancelled.
        Keys are the caller's own (the IETF Idempotency-Key draft scopes them to the client): another
        client's or user's Task with the same key is neither found nor named."""
        candidates = (
            await SearchBuilder(self._tasks, base_url=self._base_url)
            .where_token("identifier", IDEMPOTENCY_KEY_SYSTEM, key)
            .sort("-_lastUpdated")
            .count(20)
            .matches()
        )
        caller = current_access.get() or Access.unrestricted()
        for task in candidates:
            if task.get("status") in ("failed", "cancelled", "entered-in-error"):
                continue
            if self._same_caller(await self._author(task["id"], "1"), caller):
                return task
        return None

    async def _author(self, task_id: str, version_id: str) -> str | None:
        return await self._tasks.author_of(task_id, version_id)

    @staticmethod
    def _same_caller(principal: str | None, caller: Access) -> bool:
        """Whether the Task's creator (`principal`) is `caller`: the same client for the same user.
        Without authentication (FACADE_AUTH=none) there is one caller, recorded as None."""
        if not caller.enforced:
            return principal is None
        return principal is not None and Access.from_principal(principal).same_principal(caller)

    async def _start(
        self, study: dict[str, Any], model_id: str | None, series_uid: str | None, key: str | None
    ) -> AnalysisJob:
        manifest = self.analyzer.manifest(model_id)
        task: dict[str, Any] = {
            "resourceType": "Task",
            "status": "in-progress",
            "intent": "order",
            "code": {"coding": [ANALYZE_CODE]},
            "focus": {"reference": f"ImagingStudy/{study['id']}"},
            "description": f"Analyze study with {manifest.id} ($analyze)",
            "input": [{"type": {"text": "model"}, "valueString": manifest.id}],
        }
        if key is not None:
            task["identifier"] = [{"system": IDEMPOTENCY_KEY_SYSTEM, "value": key}]
        if study.get("subject", {}).get("reference"):
            task["for"] = {"reference": study["subject"]["reference"]}
        if study.get("basedOn"):
            task["basedOn"] = [{"reference": r["reference"]} for r in study["basedOn"] if r.get("reference")]
        if series_uid:
            task["input"].append({"type": {"text": "series"}, "valueString": series_uid})
        stored = await self._tasks.create(with_analysis_task_narrative(task))
        return self._launch(stored, model_id, series_uid, study)

    def _launch(
        self,
        task: dict[str, Any],
        model_id: str | None,
        series_uid: str | None,
        study: dict[str, Any] | None = None,
    ) -> AnalysisJob:
        study_id = _focus_id(task)
        job = AnalysisJob(task["id"], study_id, model_id, series_uid, study)
        job.runner = asyncio.create_task(self._run(job, task), name=f"analyze-{task['id']}")
        self._running[job.task_id] = job
        job.runner.add_done_callback(lambda _: self._running.pop(job.task_id, None))
        return job

    async def _run(self, job: AnalysisJob, task: dict[str, Any]) -> AnalysisOutcome:
        enter_origin(Origin.INTERNAL)  # the job's own task: work done for the client it runs as
        try:
            async with self._slots:
                return await self.analyzer.analyze(
                    job.study_id,
                    model_id=job.model_id,
                    series_uid=job.series_uid,
                    progress=job.progress,
                    task=task,
                    study=job.study,
                )
        except asyncio.CancelledError:
            await self._finish(job.task_id, "cancelled", None, "Cancelled by the client")
            raise
        except FhirError as error:
            issue = error.issues[0]
            await self._finish(job.task_id, "failed", issue.detail_code, issue.diagnostics)
            raise
        except Exception as exc:
            log.exception("Analysis job %s failed", job.task_id)
            await self._finish(job.task_id, "failed", None, f"Internal error: {type(exc).__name__}")
            raise internal_error() from exc

    async def _finish(self, task_id: str, status: str, detail_code: str | None, text: str) -> None:
        """Record a job's end that is not a result; the result's own transaction records success."""
        with contextlib.suppress(asyncio.CancelledError):
            try:
                current = await self._tasks.read(task_id)
                reason: dict[str, Any] = {"text": text}
                if detail_code:
                    reason["coding"] = [{"system": FACADE_ISSUE_SYSTEM, "code": detail_code}]
                updated = with_analysis_task_narrative({**current, "status": status, "statusReason": reason})
                updated.pop("meta", None)
                await self._tasks.update(task_id, updated, if_match=None)
            except Exception:  # the job's own failure is what the caller must see
                log.exception("Could not record the end (%s) of analysis Task %s", status, task_id)

    # -- results and status ---------------------------------------------------------------------

    async def wait(self, job: AnalysisJob) -> dict[str, Any]:
        """The report of a job this request waits for; the job goes on if the client leaves."""
        assert job.runner is not None
        outcome = await asyncio.shield(job.runner)
        return outcome.report

    async def state(self, task_id: str, *, own: bool = False) -> JobState:
        """A job's state. Its report is read with the current caller's rights, unless `own`: a retry
        of the caller's own keyed request, whose report it created (it may hold create but not read
        on DiagnosticReport)."""
        job = self._running.get(task_id)
        if job is not None and job.runner is not None and not job.runner.done():
            return JobState(running=True, progress=job.progress_text)
        task = await self._analysis_task(task_id)
        status = task.get("status")
        if status == "completed":
            reports = self._visible_inner("DiagnosticReport") if own else self._reports
            return JobState(running=False, report=await self._report_of(task, reports))
        if status in ("failed", "cancelled", "rejected", "entered-in-error"):
            return JobState(running=False, error=_task_error(task))
        return JobState(running=True, progress=f"Task {status}")

    async def _analysis_task(self, task_id: str) -> dict[str, Any]:
        task = await self._tasks.read(task_id)
        codes = task.get("code", {}).get("coding", [])
        if not any(c.get("system") == TASK_CODE_SYSTEM and c.get("code") == "analyze" for c in codes):
            raise not_found(f"No analysis job {task_id}")
        return task

    def _visible_inner(self, resource_type: str) -> ResourceProvider:
        return self._visible[resource_type].inner

    async def _report_of(self, task: dict[str, Any], reports: ResourceProvider) -> dict[str, Any]:
        for output in task.get("output", []):
            reference = output.get("valueReference", {}).get("reference", "")
            target = local_target(reference) if isinstance(reference, str) else None
            if target is not None and target[0] == "DiagnosticReport":
                return await reports.read(target[1])
        raise internal_error(f"Completed analysis Task {task['id']} has no DiagnosticReport output")

    async def cancel(self, task_id: str) -> None:
        """DELETE on the status URL: stop a running job (its Task becomes cancelled)."""
        job = self._running.get(task_id)
        if job is None or job.runner is None or job.runner.done():
            task = await self._analysis_task(task_id)
            if task.get("status") in ("requested", "received", "accepted", "ready"):
                await self._finish(task_id, "cancelled", None, "Cancelled by the client")
                return
            raise conflict(f"Analysis job {task_id} is not running (Task status {task.get('status')})")
        job.runner.cancel()
        with contextlib.suppress(asyncio.CancelledError, FhirError):
            await job.runner

    # -- the worklist -------------------------------------------------------------------------------

    async def run_worklist(self, stop: asyncio.Event, poll_interval: float) -> None:
        """Claim and run requested analysis Tasks until `stop` is set."""
        while not stop.is_set():
            try:
                await self._claim_requested()
            except Exception:
                log.exception("Analysis worklist poll failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll_interval)

    async def _claim_requested(self) -> None:
        free = self._workers - len(self._running)
        if free <= 0:
            return
        requested = (
            await SearchBuilder(self._tasks, base_url=self._base_url)
            .where("status", "requested")
            .where_token("code", TASK_CODE_SYSTEM, ANALYZE_CODE["code"])
            .sort("-priority", "authored-on")
            .count(free)
            .matches()
        )
        for task in requested:
            with correlation_scope():  # one id per worklist job, for its PACS and model requests
                requester = await self._requester(task)
                claimed = await self._claim(task)
                if claimed is None:
                    continue
                with acting_as(requester):  # the job, its reads and its writes run with these rights
                    if await self._may_run(claimed, requester):
                        model = _task_input(claimed, "model")
                        self._launch(claimed, model, _task_input(claimed, "series"))

    async def _requester(self, task: dict[str, Any]) -> Access:
        """Whose rights a requested Task runs with: the author of the version that requested it (the
        server's own, unrestricted, for Tasks the server wrote, e.g. arrival Tasks)."""
        principal = await self._author(task["id"], str(task.get("meta", {}).get("versionId", "")))
        return Access.from_principal(principal) if principal else Access.unrestricted()

    async def _may_run(self, task: dict[str, Any], requester: Access) -> bool:
        """Check, now, with the requester's rights, what running the Task acts on: `$analyze` on its
        focus study (read on the study, create on DiagnosticReport), and every resource it references
        (basedOn orders...) must be visible to the requester. A refusal fails the Task, saying why in
        terms that name nothing the requester may not see."""
        try:
            study_id = _focus_id(task)
            await check_analysis_rights(self._studies, study_id)
            patients = requester.confinement(Interaction.READ, "ImagingStudy")
            if patients is not None:
                await self._authorization.check_references("Task", task, patients)
        except FhirError as error:
            issue = error.issues[0]
            log.warning("Analysis Task %s refused for %s: %s", task["id"], requester.who, issue.diagnostics)
            await self._finish(task["id"], "failed", issue.detail_code, str(issue.diagnostics))
            return False
        return True

    async def _claim(self, task: dict[str, Any]) -> dict[str, Any] | None:
        focus = task.get("focus", {}).get("reference", "")
        if not focus.startswith("ImagingStudy/"):
            await self._finish(task["id"], "failed", None, "Task.focus is not an ImagingStudy")
            return None
        updated = with_analysis_task_narrative({**task, "status": "in-progress"})
        updated.pop("meta", None)
        version = task.get("meta", {}).get("versionId")
        try:
            result = await self._tasks.update(task["id"], updated, if_match=f'W/"{version}"')
        except FhirError as error:
            if error.status in (409, 412):
                return None  # another worker took it first
            raise
        log.info("Claimed analysis Task %s for %s", task["id"], focus)
        return result.resource

    async def close(self) -> None:
        """Stop running jobs (their Tasks become cancelled)."""
        for job in list(self._running.values()):
            if job.runner is not None:
                job.runner.cancel()
        for job in list(self._running.values()):
            if job.runner is not None:
                with contextlib.suppress(BaseException):
                    await job.runner


def _task_input(task: dict[str, Any], name: str) -> str | None:
    for item in task.get("input", []):
        if item.get("type", {}).get("text") == name and isinstance(item.get("valueString"), str):
            return str(item["valueString"])
    return None


def _task_error(task: dict[str, Any]) -> FhirError:
    reason = task.get("statusReason", {})
    text = reason.get("text") or f"Analysis {task.get('status')}"
    if task.get("status") == "cancelled":
        return FhirError(404, [Issue("not-found", f"Analysis job {task['id']} was cancelled")])
    detail = next(
        (c.get("code") for c in reason.get("coding", []) if c.get("system") == FACADE_ISSUE_SYSTEM), None
    )
    status = _STATUS_BY_DETAIL.get(detail or "", 500)
    code = {422: "processing", 503: "transient", 504: "timeout", 400: "code-invalid"}.get(status, "exception")
    return FhirError(status, [Issue(code, text, detail_code=detail)])


def _focus_id(task: dict[str, Any]) -> str:
    """The id of the ImagingStudy an analysis Task is about (its focus, checked on creation)."""
    target = local_target(str(task["focus"]["reference"]))
    if target is None:
        raise internal_error(f"Analysis Task {task.get('id')} has no resolvable focus")
    return target[1]
