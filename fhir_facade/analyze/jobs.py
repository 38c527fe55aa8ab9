"""Analysis jobs: every `$analyze` run is a Task of the worklist, and requested analysis Tasks in the
worklist are run by the same worker.

- A request creates a Task (code analyze, focus the study, status in-progress) and runs the
  analysis as an asyncio job; the finished Task (completed, output -> DiagnosticReport) is stored in
  the result's transaction; a failure sets it `failed` with the OperationOutcome's code as
  statusReason. Synchronous requests wait for the job; `Prefer: respond-async` gets its status URL.
- `Idempotency-Key` is kept as Task.identifier: a retry finds the Task and returns its report (or
  joins the running job) instead of running the model again. The search for the key's Task and the
  creation of a new one are one atomic conditional create (ADR 0012, the database's lock), so two
  replicas receiving one key at once start one analysis (ADR 0032).
- Every running job holds a lease on its Task in the store (`analysis-task:<id>`, ADR 0032),
  renewed while it runs. A job whose replica died stops renewing; once its lease has expired the
  poller of any replica claims it, moves the Task to a new version and runs it again. The result
  is written with If-Match on the version its run started from, so a run that was taken over can
  never store a second report for the Task. Status polls read the Task, so any replica answers them.
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
import uuid
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
from fhir_facade.fhir.conditional_guard import ConditionalGuard, guarded
from fhir_facade.fhir.errors import FACADE_ISSUE_SYSTEM, FhirError, Issue, conflict, internal_error, not_found
from fhir_facade.fhir.internal_search import SearchBuilder
from fhir_facade.fhir.pipeline import Origin, PipelinedProvider, enter_origin
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.references import local_target
from fhir_facade.resources.stored import StoredResourceProvider
from fhir_facade.store.leases import Leases

__all__ = ["IDEMPOTENCY_KEY_SYSTEM", "JOB_LEASE_PREFIX", "AnalysisJob", "AnalysisJobs", "JobState"]

log = logging.getLogger(__name__)

#: Task.identifier.system of a client's Idempotency-Key.
IDEMPOTENCY_KEY_SYSTEM = "http://fhir-facade.org/fhir/sid/idempotency-key"

#: Lease names of running analysis Tasks: the prefix and the Task id.
JOB_LEASE_PREFIX = "analysis-task:"

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
    #: The Task version the job started from: its writes are conditional on it (If-Match).
    version: str = ""
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
        leases: Leases,
    ) -> None:
        """`tasks`: the store's Task provider (job Tasks are the server's records). `visible`: the
        pipelined providers, through which everything is read that a caller is handed or that the
        worklist acts on for a client; `authorization`: the pipeline's authorization stage, for the
        checks a job makes before it acts. `leases`: this replica's leases on the Tasks it runs."""
        self.analyzer = analyzer
        self._leases = leases
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
        """Inside the key's lock: the same report, the running job, or a new one. The key's search
        and the new Task are one conditional create (fhir/conditional_guard.py): of replicas that
        get the key at once, one creates the Task and the others find it."""
        search = (
            SearchBuilder(self._tasks, base_url=self._base_url)
            .where_token("identifier", IDEMPOTENCY_KEY_SYSTEM, idempotency_key)
            .sort("-_lastUpdated")
            .count(20)
        )

        async def attempt(guard: ConditionalGuard) -> tuple[str, AnalysisJob | None, dict[str, Any] | None]:
            with guard.searching():
                candidates = await search.matches()
            existing = await self._own_live_task(candidates)
            if existing is not None:
                focus = existing.get("focus", {}).get("reference")
                if focus != f"ImagingStudy/{study_id}":
                    raise conflict(
                        f"Idempotency-Key {idempotency_key!r} was used for {focus}, "
                        f"not ImagingStudy/{study_id}"
                    )
                state = await self.state(existing["id"], own=True)
                if state.running or state.report is not None:
                    return existing["id"], self._running.get(existing["id"]), state.report
            with guard.writing():
                task = await self._create_task(study, model_id, series_uid, idempotency_key)
            # Outside the guard: the job's own writes are no part of the conditional create.
            job = self._launch(task, model_id, series_uid, study)
            return job.task_id, job, None

        return await guarded("Task", search.params, attempt)

    async def _own_live_task(self, candidates: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The newest of the Tasks carrying a key that this caller created and that is not failed
        or cancelled. Keys are the caller's own (the IETF Idempotency-Key draft scopes them to the
        client): another client's or user's Task with the same key is neither found nor named."""
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
        task = await self._create_task(study, model_id, series_uid, key)
        return self._launch(task, model_id, series_uid, study)

    async def _create_task(
        self, study: dict[str, Any], model_id: str | None, series_uid: str | None, key: str | None
    ) -> dict[str, Any]:
        """Store the in-progress Task of a new `$analyze` run, holding its lease from the start: the
        id is chosen here, the lease taken, then the Task written (update as create), so no replica
        ever sees the Task without a lease and takes it over."""
        manifest = self.analyzer.manifest(model_id)
        task: dict[str, Any] = {
            "resourceType": "Task",
            "id": uuid.uuid4().hex,
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
        lease = JOB_LEASE_PREFIX + task["id"]
        if not await asyncio.to_thread(self._leases.acquire, lease):
            raise internal_error(f"Could not take the lease of new analysis Task {task['id']}")
        try:
            result = await self._tasks.update(task["id"], with_analysis_task_narrative(task), if_match=None)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._leases.release, lease)
            raise
        return result.resource

    def _launch(
        self,
        task: dict[str, Any],
        model_id: str | None,
        series_uid: str | None,
        study: dict[str, Any] | None = None,
    ) -> AnalysisJob:
        """Run the Task (whose lease this replica holds) as an asyncio job."""
        study_id = _focus_id(task)
        version = str(task.get("meta", {}).get("versionId", ""))
        job = AnalysisJob(task["id"], study_id, model_id, series_uid, study, version=version)
        job.runner = asyncio.create_task(self._run(job, task), name=f"analyze-{task['id']}")
        self._running[job.task_id] = job
        job.runner.add_done_callback(lambda _: self._running.pop(job.task_id, None))
        return job

    async def _run(self, job: AnalysisJob, task: dict[str, Any]) -> AnalysisOutcome:
        enter_origin(Origin.INTERNAL)  # the job's own task: work done for the client it runs as
        heartbeat = asyncio.create_task(self._keep_lease(job.task_id), name=f"lease-{job.task_id}")
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
            await self._finish(job.task_id, "cancelled", None, "Cancelled by the client", job.version)
            raise
        except FhirError as error:
            issue = error.issues[0]
            await self._finish(job.task_id, "failed", issue.detail_code, issue.diagnostics, job.version)
            raise
        except Exception as exc:
            log.exception("Analysis job %s failed", job.task_id)
            await self._finish(
                job.task_id, "failed", None, f"Internal error: {type(exc).__name__}", job.version
            )
            raise internal_error() from exc
        finally:
            heartbeat.cancel()
            with contextlib.suppress(BaseException):
                await heartbeat
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._leases.release, JOB_LEASE_PREFIX + job.task_id)

    async def _keep_lease(self, task_id: str) -> None:
        """Renew the job's lease every third of the lease time while it runs. A failed renewal is
        logged, not acted on: if another replica took the Task over, this run's result is refused
        when it is written (If-Match), and if the database only blinked the run is still good."""
        name = JOB_LEASE_PREFIX + task_id
        while True:
            await asyncio.sleep(self._leases.seconds / 3)
            try:
                if not await asyncio.to_thread(self._leases.acquire, name):
                    log.warning("Analysis Task %s: its lease was taken over by another replica", task_id)
            except Exception:
                log.exception("Analysis Task %s: could not renew its lease", task_id)

    async def _finish(
        self, task_id: str, status: str, detail_code: str | None, text: str, version: str | None = None
    ) -> None:
        """Record a job's end that is not a result; the result's own transaction records success.
        `version`: the Task version the job started from; when the Task has moved on (another replica
        took it over) the end is not recorded."""
        with contextlib.suppress(asyncio.CancelledError):
            try:
                current = await self._tasks.read(task_id)
                reason: dict[str, Any] = {"text": text}
                if detail_code:
                    reason["coding"] = [{"system": FACADE_ISSUE_SYSTEM, "code": detail_code}]
                updated = with_analysis_task_narrative({**current, "status": status, "statusReason": reason})
                updated.pop("meta", None)
                await self._tasks.update(task_id, updated, if_match=f'W/"{version}"' if version else None)
            except FhirError as error:
                if error.status == 412:
                    log.warning(
                        "Analysis Task %s was taken over by another replica; its end (%s) is not recorded",
                        task_id,
                        status,
                    )
                else:
                    log.exception("Could not record the end (%s) of analysis Task %s", status, task_id)
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

    async def run_worklist(
        self, stop: asyncio.Event, poll_interval: float, *, requested: bool = True
    ) -> None:
        """Until `stop` is set: take over jobs whose replica died (their lease expired) and, with
        `requested`, claim and run requested analysis Tasks."""
        while not stop.is_set():
            try:
                await self._take_over_orphans()
                if requested:
                    await self._claim_requested()
            except Exception:
                log.exception("Analysis worklist poll failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll_interval)

    async def _take_over_orphans(self) -> None:
        """Run again the in-progress Tasks whose lease expired: their replica died (or stalled for
        longer than the lease). The lease is claimed first (one replica wins each), then the Task
        moves to a new version with If-Match, which fences the old run off: its result and its end
        are written with If-Match on the old version and refused."""
        free = self._workers - len(self._running)
        if free <= 0:
            return
        for name in await asyncio.to_thread(self._leases.claim_expired, JOB_LEASE_PREFIX, free):
            task_id = name.removeprefix(JOB_LEASE_PREFIX)
            with correlation_scope():
                if not await self._take_over(task_id) and task_id not in self._running:
                    await asyncio.to_thread(self._leases.release, name)

    async def _take_over(self, task_id: str) -> bool:
        """Run an orphaned analysis Task here; False when there is nothing to run."""
        if task_id in self._running:
            return True  # this replica's own job, whose renewal was late: the lease is renewed now
        try:
            task = await self._analysis_task(task_id)
        except FhirError as error:
            if error.status in (404, 410):
                return False  # its replica died before the Task was written
            raise
        if task.get("status") != "in-progress":
            return False  # it finished after all
        requester = await self._original_requester(task)
        updated = with_analysis_task_narrative(task)
        updated.pop("meta", None)
        try:
            result = await self._tasks.update(task_id, updated, if_match=f'W/"{task["meta"]["versionId"]}"')
        except FhirError as error:
            if error.status in (409, 412):
                return False
            raise
        claimed = result.resource
        log.warning("Taking over analysis Task %s, whose replica stopped renewing its lease", task_id)
        with acting_as(requester):
            if await self._may_run(claimed, requester, claimed["meta"]["versionId"]):
                self._launch(claimed, _task_input(claimed, "model"), _task_input(claimed, "series"))
        return True

    async def _original_requester(self, task: dict[str, Any]) -> Access:
        """Whose rights an in-progress Task runs with: the author of its newest version that was not
        yet in progress (a worklist Task's `requested` version), else of its first (a `$analyze`
        Task, created in progress by the caller)."""
        current = int(task["meta"]["versionId"])
        for version in range(current - 1, 0, -1):
            earlier = await self._tasks.vread(task["id"], str(version))
            if earlier.get("status") != "in-progress":
                principal = await self._author(task["id"], str(version))
                return Access.from_principal(principal) if principal else Access.unrestricted()
        principal = await self._author(task["id"], "1")
        return Access.from_principal(principal) if principal else Access.unrestricted()

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
                    if await self._may_run(claimed, requester, claimed["meta"]["versionId"]):
                        model = _task_input(claimed, "model")
                        self._launch(claimed, model, _task_input(claimed, "series"))

    async def _requester(self, task: dict[str, Any]) -> Access:
        """Whose rights a requested Task runs with: the author of the version that requested it (the
        server's own, unrestricted, for Tasks the server wrote, e.g. arrival Tasks)."""
        principal = await self._author(task["id"], str(task.get("meta", {}).get("versionId", "")))
        return Access.from_principal(principal) if principal else Access.unrestricted()

    async def _may_run(self, task: dict[str, Any], requester: Access, version: str) -> bool:
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
            await self._finish(task["id"], "failed", issue.detail_code, str(issue.diagnostics), version)
            await asyncio.to_thread(self._leases.release, JOB_LEASE_PREFIX + task["id"])
            return False
        return True

    async def _claim(self, task: dict[str, Any]) -> dict[str, Any] | None:
        """Take a requested Task: its lease, then the move to in-progress with If-Match (another
        worker, here or on another replica, may have taken it first: then neither happens)."""
        focus = task.get("focus", {}).get("reference", "")
        if not focus.startswith("ImagingStudy/"):
            await self._finish(task["id"], "failed", None, "Task.focus is not an ImagingStudy")
            return None
        lease = JOB_LEASE_PREFIX + task["id"]
        if not await asyncio.to_thread(self._leases.acquire, lease):
            return None  # another replica is claiming it
        updated = with_analysis_task_narrative({**task, "status": "in-progress"})
        updated.pop("meta", None)
        version = task.get("meta", {}).get("versionId")
        try:
            result = await self._tasks.update(task["id"], updated, if_match=f'W/"{version}"')
        except FhirError as error:
            await asyncio.to_thread(self._leases.release, lease)
            if error.status in (409, 412):
                return None  # another worker took it first
            raise
        except BaseException:
            await asyncio.to_thread(self._leases.release, lease)
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
