"""The reading worklist (ADR 0033): one reading Task per study that needs a read, triaged by the
AI result and completed by the radiologist's final report.

Consumers of the event bus (ADR 0022), written as the server's own work:
- `StudyArrived` (after commit, when on): a new study of the arrival rule gets a `routine` reading
  Task at once, "no AI result yet".
- `ResourceChanged` of a DiagnosticReport, inside its transaction, so the Task commits with it:
  an AI report (created by `$analyze` or an analysis job: origin OPERATION/INTERNAL, preliminary,
  no interpreter) sets the open Task's priority by the triage rules and names the report as its
  input (creating the Task when there is none); a newer AI result re-triages the same Task. A
  report turning `final` completes the open Task with the report as its output.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from fhir_facade.auth.access import on_server_authority
from fhir_facade.dicom_to_fhir import patient_resource_id
from fhir_facade.fhir.conditional_guard import ConditionalGuard, guarded
from fhir_facade.fhir.internal_search import SearchBuilder, read_or_none
from fhir_facade.fhir.pipeline import EventBus, Origin, origin_scope
from fhir_facade.fhir.pipeline.events import ChangeKind, ResourceChanged
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.references import local_target
from fhir_facade.reading.codes import READ_CODE
from fhir_facade.reading.stage import SIGNED
from fhir_facade.reading.triage import Triage, TriageRules, ai_finding, triage
from fhir_facade.watcher.change_feed import StudyArrived, TaskRule

__all__ = ["OPEN_STATUSES", "ReadingWorklist", "is_ai_report", "study_uid_of"]

log = logging.getLogger(__name__)

#: Task statuses of a read not yet done (R4 task-status; `completed`, `cancelled`, `failed`,
#: `rejected`, `entered-in-error` end it).
OPEN_STATUSES = ("draft", "requested", "received", "accepted", "ready", "in-progress", "on-hold")
_AI_INPUT_TYPE = {"text": "Preliminary AI report"}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def study_uid_of(report: dict[str, Any]) -> str | None:
    """The Study Instance UID of the report's first local ImagingStudy reference."""
    for item in report.get("imagingStudy", []):
        target = local_target(item.get("reference", "")) if isinstance(item.get("reference"), str) else None
        if target is not None and target[0] == "ImagingStudy":
            return target[1]
    return None


def is_ai_report(event: ResourceChanged) -> bool:
    """A machine-made report: written by `$analyze` or its jobs, preliminary, with no interpreter."""
    report = event.after or {}
    return (
        event.context.origin in (Origin.OPERATION, Origin.INTERNAL)
        and report.get("status") == "preliminary"
        and not report.get("resultsInterpreter")
    )


class ReadingWorklist:
    """Creates, triages and completes reading Tasks. `tasks` and `observations` are pipelined."""

    def __init__(
        self,
        tasks: ResourceProvider,
        observations: ResourceProvider,
        orders: ResourceProvider,
        rules: TriageRules,
        *,
        arrival_rule: TaskRule | None,
        base_url: str,
    ) -> None:
        self._tasks = tasks
        self._observations = observations
        self._orders = orders
        self._rules = rules
        self._arrival_rule = arrival_rule
        self._base_url = base_url

    def subscribe(self, bus: EventBus) -> None:
        bus.subscribe(ResourceChanged, self.on_report, in_transaction=True)
        if self._arrival_rule is not None:
            bus.subscribe(StudyArrived, self.on_arrival)

    def _open_search(self, study_uid: str) -> SearchBuilder:
        return (
            SearchBuilder(self._tasks, base_url=self._base_url)
            .where("focus", f"ImagingStudy/{study_uid}")
            .where_token("code", READ_CODE["system"], READ_CODE["code"])
            .where_any("status", OPEN_STATUSES)
            .sort("-_lastUpdated")
            .count(1)
        )

    async def open_task(self, study_uid: str) -> dict[str, Any] | None:
        """The reading Task of the study not yet done, if any (the newest, should there be two)."""
        found = await self._open_search(study_uid).matches()
        return found[0] if found else None

    async def on_arrival(self, study: StudyArrived) -> None:
        """A new study: a routine reading Task (idempotent: a replayed arrival finds the open one)."""
        assert self._arrival_rule is not None
        if not self._arrival_rule.matches(study):
            return
        with on_server_authority(), origin_scope(Origin.INTERNAL):
            patient_id = (
                patient_resource_id(study.patient_id, study.issuer_of_patient_id)
                if study.patient_id
                else None
            )
            patient = f"Patient/{patient_id}" if patient_id else None
            order = await self._order(study.accession_number)
            task = self._new_task(study.study_uid, patient, order)
            self._apply(task, triage(self._rules, None, None), None)
            search = self._open_search(study.study_uid)

            async def attempt(guard: ConditionalGuard) -> dict[str, Any] | None:
                # Atomic like the arrival Task (ADR 0012/0032): a replayed change or two replicas
                # handling the same arrival make one Task.
                with guard.searching():
                    if await search.matches():
                        return None
                with guard.writing():
                    return await self._tasks.create(task)

            created = await guarded("Task", search.params, attempt)
            if created is not None:
                log.info("Reading Task/%s for arrived study %s", created["id"], study.study_uid)

    async def on_report(self, event: ResourceChanged) -> None:
        """In the report's transaction: triage on an AI report, completion on a final one."""
        if event.resource_type != "DiagnosticReport" or event.after is None:
            return
        report = event.after
        study_uid = study_uid_of(report)
        if study_uid is None:
            return
        was_final = (event.before or {}).get("status") in SIGNED
        with on_server_authority(), origin_scope(Origin.INTERNAL):
            if event.change is ChangeKind.CREATED and is_ai_report(event):
                await self._triage(study_uid, report)
            elif report.get("status") == "final" and not was_final:
                await self._complete(study_uid, report)

    async def _triage(self, study_uid: str, report: dict[str, Any]) -> None:
        finding = None
        results = report.get("result", [])
        if results:
            target = local_target(results[0].get("reference", ""))
            if target is not None and target[0] == "Observation":
                finding = await read_or_none(self._observations, target[1])
        codes, score = ai_finding(report, finding)
        decided = triage(self._rules, codes, score)
        task = await self.open_task(study_uid)
        if task is None:
            order = None
            for based_on in report.get("basedOn", []):
                if str(based_on.get("reference", "")).startswith("ServiceRequest/"):
                    order = based_on["reference"]
            subject = (report.get("subject") or {}).get("reference")
            task = self._new_task(study_uid, subject, order)
            self._apply(task, decided, report["id"])
            created = await self._tasks.create(task)
            log.info("Reading Task/%s (%s) for AI report %s", created["id"], decided.priority, report["id"])
            return
        self._apply(task, decided, report["id"])
        await self._tasks.update(task["id"], task, if_match=None)
        log.info("Reading Task/%s re-triaged %s by AI report %s", task["id"], decided.priority, report["id"])

    async def _complete(self, study_uid: str, report: dict[str, Any]) -> None:
        task = await self.open_task(study_uid)
        if task is None:
            return
        if task.get("owner") is None and report.get("resultsInterpreter"):
            task["owner"] = report["resultsInterpreter"][0]
        if task["status"] != "in-progress":  # signed without a claim: the R4 state machine passes
            task["status"] = "in-progress"  # through in-progress to completed (task.html)
            task = (await self._tasks.update(task["id"], task, if_match=None)).resource
        task["status"] = "completed"
        task["lastModified"] = _now()
        task["output"] = [
            {
                "type": {"text": "Signed report"},
                "valueReference": {"reference": f"DiagnosticReport/{report['id']}"},
            }
        ]
        await self._tasks.update(task["id"], task, if_match=None)
        log.info("Reading Task/%s completed by DiagnosticReport/%s", task["id"], report["id"])

    async def _order(self, accession_number: str | None) -> str | None:
        if not accession_number:
            return None
        search = SearchBuilder(self._orders, base_url=self._base_url).where("identifier", accession_number)
        orders = await search.count(2).matches()
        return f"ServiceRequest/{orders[0]['id']}" if len(orders) == 1 else None

    def _new_task(self, study_uid: str, patient: str | None, order: str | None) -> dict[str, Any]:
        task: dict[str, Any] = {
            "resourceType": "Task",
            "status": "requested",
            "intent": "order",
            "code": {"coding": [READ_CODE]},
            "focus": {"reference": f"ImagingStudy/{study_uid}"},
            "authoredOn": _now(),
            "description": f"Read imaging study {study_uid}",
        }
        if patient:
            task["for"] = {"reference": patient}
        if order:
            task["basedOn"] = [{"reference": order}]
        return task

    @staticmethod
    def _apply(task: dict[str, Any], decided: Triage, ai_report_id: str | None) -> None:
        """Set the priority, the triage note and the AI report input (replacing a previous one)."""
        task["priority"] = decided.priority
        task["lastModified"] = _now()
        notes = [n for n in task.get("note", []) if not str(n.get("text", "")).startswith("triage: ")]
        if decided.note:
            notes.append({"text": f"triage: {decided.note}"})
        if notes:
            task["note"] = notes
        else:
            task.pop("note", None)
        if ai_report_id:
            inputs = [i for i in task.get("input", []) if i.get("type") != _AI_INPUT_TYPE]
            inputs.append(
                {
                    "type": dict(_AI_INPUT_TYPE),
                    "valueReference": {"reference": f"DiagnosticReport/{ai_report_id}"},
                }
            )
            task["input"] = inputs
