"""New study -> analysis Task (the worklist's entry point).

For each stable study from the change feed: find the imaging order by AccessionNumber, and when
the `TaskRule` matches (default: MR studies) create a Task in status `requested` with code
`analyze`, focus the ImagingStudy, `for` the Patient, basedOn the order and the order's priority.
The Task carries the Study UID as identifier and is created conditionally on it, atomically (the
conditional create of ADR 0012, whose lock is the database's), so neither a replayed change
(at-least-once delivery) nor two replicas handling the same change at once (the short overlap of
a watcher failover, ADR 0032) makes a second Task.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from fhir_facade.analyze.codes import ANALYZE_CODE, TASK_CODE_SYSTEM
from fhir_facade.analyze.task_narrative import with_analysis_task_narrative
from fhir_facade.dicom_to_fhir import patient_resource_id
from fhir_facade.dicom_to_fhir.uids import uid_identifier
from fhir_facade.fhir.conditional_guard import ConditionalGuard, guarded
from fhir_facade.fhir.internal_search import SearchBuilder
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.watcher.change_feed import StudyArrived, TaskRule

__all__ = ["ANALYZE_CODE", "TASK_CODE_SYSTEM", "ArrivalTaskCreator"]

log = logging.getLogger(__name__)


class ArrivalTaskCreator:
    """The `on_study` callback of the StudyArrivalWatcher (idempotent, as the watcher requires)."""

    def __init__(
        self, tasks: ResourceProvider, orders: ResourceProvider, rule: TaskRule, base_url: str
    ) -> None:
        self._tasks = tasks
        self._orders = orders
        self._rule = rule
        self._base_url = base_url

    async def __call__(self, study: StudyArrived) -> None:
        if not self._rule.matches(study):
            return
        identifier = uid_identifier(study.study_uid)
        existing = SearchBuilder(self._tasks, base_url=self._base_url).where_token(
            "identifier", identifier["system"], identifier["value"]
        )
        task = await self._task(study, identifier)

        async def attempt(guard: ConditionalGuard) -> dict[str, Any] | None:
            with guard.searching():
                if await existing.count(1).matches():
                    return None  # already created (a replayed change, or another replica)
            with guard.writing():
                return await self._tasks.create(task)

        created = await guarded("Task", existing.params, attempt)
        if created is not None:
            log.info("Task/%s created for arrived study %s", created["id"], study.study_uid)

    async def _task(self, study: StudyArrived, identifier: dict[str, Any]) -> dict[str, Any]:
        """The Task for an arrived study (read-only work: the order lookup)."""
        orders = []
        if study.accession_number:
            search = SearchBuilder(self._orders, base_url=self._base_url).where(
                "identifier", study.accession_number
            )
            orders = await search.count(2).matches()
        task: dict[str, Any] = {
            "resourceType": "Task",
            "identifier": [identifier],
            "status": "requested",
            "intent": "order",
            "code": {"coding": [ANALYZE_CODE]},
            "focus": {"reference": f"ImagingStudy/{study.study_uid}"},
            "authoredOn": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "description": f"Analyze newly arrived study {study.study_uid}",
        }
        patient_id = (
            patient_resource_id(study.patient_id or "", study.issuer_of_patient_id)
            if study.patient_id
            else None
        )
        if patient_id:
            task["for"] = {"reference": f"Patient/{patient_id}"}
        if len(orders) == 1:
            order = orders[0]
            task["basedOn"] = [{"reference": f"ServiceRequest/{order['id']}"}]
            if order.get("priority"):
                task["priority"] = order["priority"]
        elif len(orders) > 1:
            log.warning("Accession %s matches several orders; the Task is not linked", study.accession_number)
        return with_analysis_task_narrative(task)
