"""Imaging orders -> the DICOM Modality Worklist, as a consumer of the pipeline's ResourceChanged.

An active imaging order is an item in Orthanc's worklist folder; revoking, completing or deleting
the order removes it (worklist/folder.py). The folder mirrors committed orders only, so the item is
written after the commit. An order whose modality neither a DCM coding nor the procedure catalogue
gives (ADR 0018) gets, in the order's own transaction, one open Task (code schedule) for a person,
and the client a warning naming it (R4 http.html#ops; bundle.html entry.response.outcome).

The order's validation (a 422 before anything is stored) stays with the ServiceRequest provider.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from starlette.concurrency import run_in_threadpool

from fhir_facade.auth.access import on_server_authority
from fhir_facade.fhir.errors import Issue
from fhir_facade.fhir.internal_search import SearchBuilder
from fhir_facade.fhir.pipeline import ChangeKind, EventBus, Origin, ResourceChanged, origin_scope
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.references import local_target
from fhir_facade.fhir.write_warnings import warn
from fhir_facade.worklist import (
    ModalityNotDerived,
    ProcedureCatalogue,
    WorklistFolder,
    is_imaging_order,
    is_schedulable,
    sync_service_request,
    worklist_item,
)
from fhir_facade.worklist.scheduling_task import SCHEDULE_CODE, scheduling_task

__all__ = ["OrderWorklist"]

log = logging.getLogger(__name__)

#: Reads a Patient by id (the DICOM view), None when there is none.
PatientLookup = Callable[[str], Awaitable[dict[str, Any] | None]]

_OPEN_TASK_STATUSES = ("draft", "requested", "received", "accepted", "ready", "in-progress", "on-hold")


class OrderWorklist:
    """Keeps the modality worklist in step with the stored imaging orders."""

    def __init__(
        self,
        folder: WorklistFolder,
        patients: PatientLookup,
        tasks: ResourceProvider,
        *,
        station: str,
        stations: Mapping[str, str],
        catalogue: ProcedureCatalogue,
    ) -> None:
        """`tasks`: the pipelined Task provider (scheduling Tasks are written as the server's work)."""
        self._folder = folder
        self._patients = patients
        self._tasks = tasks
        self._station = station
        self._stations = dict(stations)
        self._catalogue = catalogue

    def subscribe(self, bus: EventBus) -> None:
        bus.subscribe(ResourceChanged, self.ask_to_schedule, in_transaction=True)
        bus.subscribe(ResourceChanged, self.mirror)

    def _is_order(self, event: ResourceChanged) -> bool:
        return event.resource_type == "ServiceRequest"

    async def _patient(self, order: dict[str, Any]) -> dict[str, Any] | None:
        reference = (order.get("subject") or {}).get("reference", "")
        target = local_target(reference) if isinstance(reference, str) else None
        if target is not None and target[0] == "Patient":
            return await self._patients(target[1])
        return None

    def _modality_missing(self, order: dict[str, Any]) -> ModalityNotDerived | None:
        """Why an active imaging order cannot go on the worklist for want of a modality, if it can't."""
        if not (is_imaging_order(order, self._catalogue) and is_schedulable(order)):
            return None
        try:
            worklist_item(order, None, station_ae_title=self._station, catalogue=self._catalogue)
        except ModalityNotDerived as missing:  # raised before any other mapping check
            return missing
        except Exception:  # other gaps were refused (422) before the write, or concern the patient
            return None
        return None

    async def ask_to_schedule(self, event: ResourceChanged) -> None:
        """In the order's transaction: one open scheduling Task for an order without a modality."""
        if not self._is_order(event) or event.after is None:
            return
        missing = self._modality_missing(event.after)
        if missing is None:
            return
        order = event.after
        with on_server_authority(), origin_scope(Origin.INTERNAL):
            task = await self._open_scheduling_task(order["id"])
            if task is None:
                task = await self._tasks.create(scheduling_task(order, datetime.now(UTC)))
                log.warning(
                    "ServiceRequest/%s has no derivable modality; Task/%s asks to schedule it",
                    order["id"],
                    task["id"],
                )
        warn(
            Issue(
                "processing",
                f"Stored, but not put on the modality worklist: {missing}. "
                f"Task/{task['id']} (code schedule) asks a person to schedule it.",
                severity="warning",
                detail_code="modality_not_derived",
                expression=(missing.expression,),
            )
        )

    async def _open_scheduling_task(self, order_id: str) -> dict[str, Any] | None:
        """The scheduling Task already open for the order (an update must not add a second one)."""
        request = (
            SearchBuilder(self._tasks)
            .where("focus", f"ServiceRequest/{order_id}")
            .where_token("code", SCHEDULE_CODE["system"], SCHEDULE_CODE["code"])
            .where_any("status", _OPEN_TASK_STATUSES)
            .request()
        )
        request.snapshot = datetime.now(UTC)
        matches = (await self._tasks.search(request)).matches
        return matches[0] if matches else None

    async def mirror(self, event: ResourceChanged) -> None:
        """After commit: write, replace or remove the order's worklist item."""
        if not self._is_order(event):
            return
        order_id = event.resource_id
        if event.change is ChangeKind.DELETED or event.after is None:
            if await run_in_threadpool(self._folder.remove, order_id):
                log.info("Worklist item for deleted ServiceRequest/%s removed", order_id)
            return
        order = event.after
        if not is_imaging_order(order, self._catalogue):
            return
        patient = await self._patient(order)
        try:
            outcome = await run_in_threadpool(
                lambda: sync_service_request(
                    self._folder,
                    order,
                    patient,
                    station_ae_title=self._station,
                    stations=self._stations,
                    catalogue=self._catalogue,
                )
            )
        except ModalityNotDerived:
            # No modality: an earlier item, from a version that had one, is withdrawn.
            if await run_in_threadpool(self._folder.remove, order_id):
                log.info("Worklist item for ServiceRequest/%s withdrawn: no modality", order_id)
            return
        log.info("Worklist item for ServiceRequest/%s: %s", order_id, outcome)
