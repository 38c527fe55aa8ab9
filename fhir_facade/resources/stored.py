"""Persistent resource types, kept in the facade's SQL store (the registry's stored types,
capability/resource-types.json: ServiceRequest, Task, DiagnosticReport, Observation, Device,
Provenance, AuditEvent, ...): every FHIR interaction, delegated to `ResourceStore` in a
worker thread (the store is synchronous, ADR 0004). Search parameters and `_include` paths are the
registry's (fhir/registry.py); a type with no rules of its own needs no code here. AuditEvent is
read-only through the API: the audit recorder writes it to the store directly."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from starlette.concurrency import run_in_threadpool

from fhir_facade.fhir.bundles import SearchResult
from fhir_facade.fhir.conditional_guard import active_guard
from fhir_facade.fhir.errors import FhirError, Issue, method_not_allowed
from fhir_facade.fhir.provider import ResourceProvider, WriteResult
from fhir_facade.fhir.registry import registry
from fhir_facade.fhir.required_bindings import check_required_bindings
from fhir_facade.fhir.search import SearchParamDef, SearchRequest
from fhir_facade.resources.task_lifecycle import check_transition, stamp_task
from fhir_facade.store import ResourceStore, search_param_defs
from fhir_facade.worklist import (
    ModalityNotDerived,
    ProcedureCatalogue,
    WorklistFolder,
    WorklistMappingError,
    bundled_catalogue,
    is_imaging_order,
    worklist_item,
)

__all__ = [
    "PERSISTENT_TYPES",
    "AuditEventProvider",
    "ServiceRequestProvider",
    "StoredResourceProvider",
    "TaskProvider",
    "stored_providers",
]

log = logging.getLogger(__name__)

#: Reads a Patient by id (the DICOM view), None when there is none.
PatientLookup = Callable[[str], Awaitable[dict[str, Any] | None]]


class StoredResourceProvider(ResourceProvider):
    """All R4 interactions of one type on the SQL store."""

    def __init__(self, resource_type: str, store: ResourceStore) -> None:
        self.resource_type = resource_type  # type: ignore[misc]
        self.documentation = "Persistent: stored by the facade (SQL), versioned."  # type: ignore[misc]
        self._store = store
        self._params = search_param_defs(resource_type)
        facts = registry().facts(resource_type)
        self.include_paths = facts.include_paths if facts else {}  # type: ignore[misc]

    @property
    def interactions(self) -> tuple[str, ...]:
        return (
            "read",
            "vread",
            "update",
            "delete",
            "history-instance",
            "history-type",
            "create",
            "search-type",
        )

    @property
    def search_param_map(self) -> dict[str, SearchParamDef]:
        return self._params

    @property
    def sortable(self) -> frozenset[str]:  # type: ignore[override]  # ClassVar on the base
        """The `_sort` keys the store orders this type by (ResourceStore.sortable)."""
        return self._store.sortable(self.resource_type)

    async def read(self, resource_id: str) -> dict[str, Any]:
        return await run_in_threadpool(self._store.read, self.resource_type, resource_id)

    async def vread(self, resource_id: str, version_id: str) -> dict[str, Any]:
        return await run_in_threadpool(self._store.vread, self.resource_type, resource_id, version_id)

    async def author_of(self, resource_id: str, version_id: str) -> str | None:
        """The principal that wrote this version (None: the server itself); see store/authorship.py."""
        return await run_in_threadpool(self._store.author_of, self.resource_type, resource_id, version_id)

    async def search(self, request: SearchRequest) -> SearchResult:
        # The search of a conditional write is recorded for the write to check again under the
        # lock (fhir/conditional_guard.py). It takes no paging snapshot: it must see every
        # committed match, also one written by a replica whose clock runs ahead.
        guard = active_guard(self.resource_type, "searching")
        if request.snapshot is None and guard is None:
            request.snapshot = datetime.now(UTC)
        matches, total = await run_in_threadpool(self._store.search, request)
        if guard is not None:
            guard.record(request, [m["id"] for m in matches], total)
        more = request.offset + request.count < total
        return SearchResult(
            matches, total if request.total != "none" else None, more, snapshot=request.snapshot
        )

    async def create(self, resource: dict[str, Any]) -> dict[str, Any]:
        check_required_bindings(resource)  # a bad code is a 400 before any type rule (the store checks too)
        prepared = self.prepare(resource, None)
        await self.check(prepared)
        guard = active_guard(self.resource_type, "writing")
        return await run_in_threadpool(lambda: self._store.create(prepared, guard=guard))

    async def update(
        self, resource_id: str, resource: dict[str, Any], *, if_match: str | None
    ) -> WriteResult:
        check_required_bindings(resource)
        current = await self._current(resource_id)
        prepared = self.prepare({**resource, "id": resource_id}, current)
        await self.check(prepared)
        guard = active_guard(self.resource_type, "writing")
        return await run_in_threadpool(lambda: self._store.update(prepared, if_match, guard=guard))

    async def delete(self, resource_id: str) -> None:
        await run_in_threadpool(self._store.delete, self.resource_type, resource_id)

    async def history(
        self, resource_id: str | None, count: int, offset: int
    ) -> tuple[list[dict[str, Any]], int]:
        if resource_id is None:
            return await run_in_threadpool(
                lambda: self._store.type_history(self.resource_type, count=count, offset=offset)
            )
        return await run_in_threadpool(
            lambda: self._store.history(self.resource_type, resource_id, count=count, offset=offset)
        )

    def prepare(self, resource: dict[str, Any], current: dict[str, Any] | None) -> dict[str, Any]:
        """Type-specific rules applied before a write (the current version, if any, given)."""
        return resource

    async def check(self, resource: dict[str, Any]) -> None:
        """Type-specific validation beyond the FHIR structure; raises FhirError (e.g. 422)."""

    async def _current(self, resource_id: str) -> dict[str, Any] | None:
        try:
            return await self.read(resource_id)
        except FhirError as error:
            if error.status in (404, 410):
                return None
            raise


class TaskProvider(StoredResourceProvider):
    """Task: the worklist. The R4 state machine is enforced and lastModified kept (task.html)."""

    def __init__(self, store: ResourceStore) -> None:
        super().__init__("Task", store)

    def prepare(self, resource: dict[str, Any], current: dict[str, Any] | None) -> dict[str, Any]:
        if current is not None and isinstance(resource.get("status"), str):
            check_transition(str(current.get("status")), resource["status"])
            resource = {**resource, "authoredOn": resource.get("authoredOn", current.get("authoredOn"))}
        return stamp_task(resource, datetime.now(UTC))


class ServiceRequestProvider(StoredResourceProvider):
    """ServiceRequest: imaging orders. An active imaging order must be one the modality worklist can
    take: the item is checked before the order is stored (a 422 names what is missing, e.g. the start
    time). The worklist itself follows the stored orders as a consumer of the pipeline's events
    (resources/order_worklist.py), as does the scheduling Task for an order without a modality
    (stored all the same, ADR 0018).
    """

    def __init__(
        self,
        store: ResourceStore,
        folder: WorklistFolder | None,
        patients: PatientLookup,
        station: str,
        *,
        catalogue: ProcedureCatalogue | None = None,
        stations: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__("ServiceRequest", store)
        self._folder = folder
        self._patients = patients
        self._station = station
        self._catalogue = catalogue if catalogue is not None else bundled_catalogue()
        self._stations = dict(stations or {})

    async def _patient(self, order: dict[str, Any]) -> dict[str, Any] | None:
        reference = (order.get("subject") or {}).get("reference", "")
        if isinstance(reference, str) and reference.startswith("Patient/"):
            return await self._patients(reference.removeprefix("Patient/"))
        return None

    async def check(self, resource: dict[str, Any]) -> None:
        if (
            self._folder is None
            or not is_imaging_order(resource, self._catalogue)
            or resource.get("status") != "active"
        ):
            return
        try:
            worklist_item(
                {**resource, "id": resource.get("id") or "new"},
                await self._patient(resource),
                station_ae_title=self._station,
                stations=self._stations,
                catalogue=self._catalogue,
            )
        except ModalityNotDerived:
            return  # stored all the same; the order worklist asks a person to schedule it
        except WorklistMappingError as error:
            raise FhirError(
                422,
                [
                    Issue(
                        "required",
                        f"Cannot schedule this imaging order: {error}",
                        expression=(error.expression,),
                    )
                ],
            ) from error


class AuditEventProvider(StoredResourceProvider):
    """AuditEvent: the record of every interaction (fhir_facade.audit). Read, search and history
    only: audit records are immutable, so create, update and delete through the API are 405
    (routes are not even registered; these overrides also refuse them inside Bundles). The
    recorder writes through `ResourceStore` on the server's own authority."""

    def __init__(self, store: ResourceStore) -> None:
        super().__init__("AuditEvent", store)
        self.documentation = (  # type: ignore[misc]
            "Persistent, read-only: one AuditEvent per FHIR, DICOMweb and operation request, "
            "written by the server (FACADE_AUDIT_ENABLED)."
        )

    @property
    def interactions(self) -> tuple[str, ...]:
        return ("read", "vread", "history-instance", "history-type", "search-type")

    async def create(self, resource: dict[str, Any]) -> dict[str, Any]:
        raise method_not_allowed("AuditEvents are recorded by the server and cannot be created")

    async def update(
        self, resource_id: str, resource: dict[str, Any], *, if_match: str | None
    ) -> WriteResult:
        raise method_not_allowed("AuditEvents are immutable and cannot be updated")

    async def delete(self, resource_id: str) -> None:
        raise method_not_allowed("AuditEvents are immutable and cannot be deleted")


#: The persistent types, each with the parameters the store indexes (the registry's stored types).
PERSISTENT_TYPES = registry().stored_types


def stored_providers(
    store: ResourceStore,
    worklist: WorklistFolder | None,
    patients: PatientLookup,
    station: str,
    *,
    catalogue: ProcedureCatalogue | None = None,
    stations: Mapping[str, str] | None = None,
) -> list[StoredResourceProvider]:
    """One provider per stored type: the type's own class where it has rules of its own (Task's
    state machine, ServiceRequest's worklist check, AuditEvent's immutability), else the generic one."""
    own: dict[str, Callable[[], StoredResourceProvider]] = {
        "Task": lambda: TaskProvider(store),
        "ServiceRequest": lambda: ServiceRequestProvider(
            store, worklist, patients, station, catalogue=catalogue, stations=stations
        ),
        "AuditEvent": lambda: AuditEventProvider(store),
    }
    return [own[t]() if t in own else StoredResourceProvider(t, store) for t in PERSISTENT_TYPES]
