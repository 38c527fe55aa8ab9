"""`ResourceStore`: the persistent FHIR resources (FHIR R4 http.html), on SQLite or PostgreSQL.

One method per interaction, synchronous (SQLAlchemy Core on a pooled Engine): the async app calls
them through `starlette.concurrency.run_in_threadpool` (anyio worker threads), see
docs/adr/0004-persistent-store.md. Resources are plain JSON dicts in and out (ADR 0001); every
write validates against `fhir.resources.R4B` first and runs in one database transaction that
writes the version, moves the current pointer and replaces the search index rows.

This class is the store's public face; the work is in modules with one job each (ADR 0025):
`writes` (one version on a connection), `search_sql` (SearchRequest -> SQL), `transactions`
(the ambient transaction and snapshot reads), `validation`, `etags` and `tables`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, func, select
from sqlalchemy.exc import IntegrityError

from fhir_facade.fhir.conditional_guard import ConditionalGuard
from fhir_facade.fhir.errors import FhirError, bad_request, gone, not_found
from fhir_facade.fhir.ids import is_fhir_id
from fhir_facade.fhir.pipeline import EventBus
from fhir_facade.fhir.provider import WriteResult
from fhir_facade.fhir.search import SearchRequest
from fhir_facade.store import transactions
from fhir_facade.store.etags import parse_etag
from fhir_facade.store.indexing import sortable_params
from fhir_facade.store.search_sql import search_terms
from fhir_facade.store.tables import CURRENT, VERSION, current_version_join
from fhir_facade.store.transactions import AMBIENT_TRANSACTION, reading, write_connection
from fhir_facade.store.validation import check_id, check_type, validate_resource
from fhir_facade.store.writes import write_version

__all__ = ["AMBIENT_TRANSACTION", "ResourceStore"]

#: A write that loses a race for a new resource id (two update-as-create) is retried this often.
_WRITE_ATTEMPTS = 5


class ResourceStore:
    """Versioned FHIR resources with search indexes, on one SQLAlchemy Engine.

    `clock` is injectable so tests can write resources at known instants. Every version written is
    announced on `bus` as a pre-commit `VersionStored`, inside the write's transaction: what must
    commit with it (the sync outbox, ADR 0007) subscribes there; the store knows of no consumer.
    """

    def __init__(
        self, engine: Engine, *, clock: Callable[[], datetime] | None = None, bus: EventBus | None = None
    ) -> None:
        self._engine = engine
        self.engine = engine
        self._clock = clock or (lambda: datetime.now(UTC))
        self.bus = bus if bus is not None else EventBus()

    # -- writes -------------------------------------------------------------------------------

    def create(self, resource: dict[str, Any], *, guard: ConditionalGuard | None = None) -> dict[str, Any]:
        """FHIR http.html#create: store a new resource under a server-assigned id (any id in the
        body is ignored, as the spec says), versionId "1". Returns the stored resource.
        `guard`: the create is conditional (http.html#ccreate), see `_hold_condition`."""
        resource_type = check_type(resource)
        resource_id = uuid.uuid4().hex
        stored, _ = self._write(
            resource_type, resource_id, {**resource, "id": resource_id}, if_match=None, guard=guard
        )
        return stored

    def update(
        self, resource: dict[str, Any], if_match: str | None = None, *, guard: ConditionalGuard | None = None
    ) -> WriteResult:
        """FHIR http.html#update: a new current version of `resource["id"]`. If the resource does
        not exist it is created with that id (update-as-create, http.html#upsert); a deleted one
        comes back to life with the next version. `if_match` is the client's ETag (`W/"n"`);
        a different current version is a 412 (http.html#concurrency). `guard`: the update is
        conditional (http.html#cond-update), see `_hold_condition`."""
        resource_type = check_type(resource)
        resource_id = resource.get("id")
        if not isinstance(resource_id, str) or not is_fhir_id(resource_id):
            raise bad_request("An update needs a valid resource id", expression=f"{resource_type}.id")
        stored, created = self._write(resource_type, resource_id, resource, if_match=if_match, guard=guard)
        return WriteResult(stored, created)

    def delete(self, resource_type: str, resource_id: str) -> None:
        """FHIR http.html#delete: record a deleted version; later reads answer 410. Idempotent:
        deleting a deleted or unknown resource changes nothing and succeeds (the spec allows
        200/204 for "nothing to delete")."""
        check_id(resource_type, resource_id)
        self._write(resource_type, resource_id, None, if_match=None)

    def _write(
        self,
        resource_type: str,
        resource_id: str,
        resource: dict[str, Any] | None,
        *,
        if_match: str | None,
        guard: ConditionalGuard | None = None,
    ) -> tuple[dict[str, Any], bool]:
        if resource is not None:
            validate_resource(
                resource_type, {**resource, "meta": {**resource.get("meta", {}), "versionId": "1"}}
            )
        expected = parse_etag(if_match) if if_match is not None else None

        def write_in(connection: Connection) -> tuple[dict[str, Any], bool]:
            return write_version(
                connection,
                resource_type,
                resource_id,
                resource,
                if_match,
                expected,
                guard,
                clock=self._clock,
                bus=self.bus,
            )

        ambient = AMBIENT_TRANSACTION.get()
        if ambient is not None:
            return write_in(ambient)
        for attempt in range(_WRITE_ATTEMPTS):
            try:
                connection = write_connection(self._engine)
                with connection, connection.begin():
                    return write_in(connection)
            except IntegrityError:
                # Another transaction created the same id between our SELECT and INSERT (only
                # possible for a new id: existing rows are locked). Retry sees its row.
                if attempt == _WRITE_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    # -- reads --------------------------------------------------------------------------------

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """FHIR http.html#read: the current version; 404 if never stored, 410 if deleted."""
        check_id(resource_type, resource_id)
        with reading(self._engine) as connection:
            row = connection.execute(
                select(VERSION.c.resource_json, CURRENT.c.deleted)
                .join_from(CURRENT, VERSION, current_version_join())
                .where(CURRENT.c.resource_type == resource_type, CURRENT.c.resource_id == resource_id)
            ).first()
        if row is None:
            raise not_found(f"{resource_type}/{resource_id} is not known")
        if row.deleted:
            raise gone(f"{resource_type}/{resource_id} has been deleted")
        result: dict[str, Any] = json.loads(row.resource_json)
        return result

    def author_of(self, resource_type: str, resource_id: str, version_id: str) -> str | None:
        """The principal that wrote a version (store/authorship.py); None for the server's own writes
        and for an unknown version."""
        check_id(resource_type, resource_id)
        if not version_id.isdigit():
            return None
        with reading(self._engine) as connection:
            author: str | None = connection.execute(
                select(VERSION.c.author).where(
                    VERSION.c.resource_type == resource_type,
                    VERSION.c.resource_id == resource_id,
                    VERSION.c.version_id == int(version_id),
                )
            ).scalar_one_or_none()
        return author

    def exists(self, resource_type: str, resource_id: str) -> bool:
        """Whether a current, not deleted version exists."""
        try:
            self.read(resource_type, resource_id)
        except FhirError as error:
            if error.status in (404, 410):
                return False
            raise
        return True

    @classmethod
    def validate(cls, resource: dict[str, Any]) -> None:
        """The validation every write runs (400/422 OperationOutcome on failure), without writing:
        for callers that build resources and must know they are valid before any side effect."""
        validate_resource(check_type(resource), resource)

    def vread(self, resource_type: str, resource_id: str, version_id: str) -> dict[str, Any]:
        """FHIR http.html#vread: one version; 404 if it does not exist, 410 if that version is a
        deletion (the spec: "410 Gone" for a deleted version)."""
        check_id(resource_type, resource_id)
        # Versions are 1, 2, ...: only ASCII digits that fit the column's 64-bit integer can name one.
        if not (version_id.isascii() and version_id.isdigit()) or len(version_id) > 18:
            raise not_found(f"{resource_type}/{resource_id} has no version '{version_id}'")
        with reading(self._engine) as connection:
            row = connection.execute(
                select(VERSION.c.resource_json, VERSION.c.deleted).where(
                    VERSION.c.resource_type == resource_type,
                    VERSION.c.resource_id == resource_id,
                    VERSION.c.version_id == int(version_id),
                )
            ).first()
        if row is None:
            raise not_found(f"{resource_type}/{resource_id} has no version '{version_id}'")
        if row.deleted:
            raise gone(f"{resource_type}/{resource_id} version {version_id} is a deletion")
        result: dict[str, Any] = json.loads(row.resource_json)
        return result

    def versions(self, keys: Sequence[tuple[str, str, int]]) -> dict[tuple[str, str, int], dict[str, Any]]:
        """Many (type, id, version) at once, for the sync worker; deletions and unknown keys are
        left out. One query per resource type instead of one per version."""
        found: dict[tuple[str, str, int], dict[str, Any]] = {}
        by_type: dict[str, list[tuple[str, int]]] = {}
        for resource_type, resource_id, version in keys:
            by_type.setdefault(resource_type, []).append((resource_id, version))
        with reading(self._engine) as connection:
            for resource_type, wanted in by_type.items():
                rows = connection.execute(
                    select(VERSION.c.resource_id, VERSION.c.version_id, VERSION.c.resource_json).where(
                        VERSION.c.resource_type == resource_type,
                        VERSION.c.resource_id.in_({resource_id for resource_id, _ in wanted}),
                        VERSION.c.deleted.is_(False),
                    )
                ).all()
                targets = set(wanted)
                for row in rows:
                    if (row.resource_id, row.version_id) in targets:
                        found[(resource_type, row.resource_id, row.version_id)] = json.loads(
                            row.resource_json
                        )
        return found

    def history(
        self, resource_type: str, resource_id: str, *, count: int = 50, offset: int = 0
    ) -> tuple[list[dict[str, Any]], int]:
        """FHIR http.html#history (instance): all versions, newest first, as (page, total).
        Deleted versions are stubs (resourceType, id, meta) marked `"_deleted": True`, the shape
        `fhir.write_interactions.history_bundle` expects. 404 for a resource never stored."""
        check_id(resource_type, resource_id)
        where = (VERSION.c.resource_type == resource_type, VERSION.c.resource_id == resource_id)
        entries, total = self._history(where, (VERSION.c.version_id.desc(),), count, offset)
        if total == 0:
            raise not_found(f"{resource_type}/{resource_id} is not known")
        return entries, total

    def type_history(
        self, resource_type: str, *, count: int = 50, offset: int = 0
    ) -> tuple[list[dict[str, Any]], int]:
        """FHIR http.html#history (type level): every version of every resource of the type,
        newest first (lastUpdated, then id and version for a stable order), as (page, total)."""
        order = (VERSION.c.last_updated.desc(), VERSION.c.resource_id, VERSION.c.version_id.desc())
        return self._history((VERSION.c.resource_type == resource_type,), order, count, offset)

    def _history(
        self,
        where: Sequence[ColumnElement[bool]],
        order: Sequence[Any],
        count: int,
        offset: int,
    ) -> tuple[list[dict[str, Any]], int]:
        with reading(self._engine) as connection:
            total = connection.execute(select(func.count()).select_from(VERSION).where(*where)).scalar_one()
            rows = connection.execute(
                select(VERSION.c.resource_json, VERSION.c.deleted)
                .where(*where)
                .order_by(*order)
                .limit(count)
                .offset(offset)
            ).all()
        entries = []
        for row in rows:
            entry: dict[str, Any] = json.loads(row.resource_json)
            if row.deleted:
                entry["_deleted"] = True
            entries.append(entry)
        return entries, int(total)

    # -- search -------------------------------------------------------------------------------

    def search(self, request: SearchRequest) -> tuple[list[dict[str, Any]], int]:
        """FHIR search.html: one page of current, non-deleted matches and the total.

        Comma-separated values are ORed and repeated parameters ANDed (search.html#combining);
        each value is an EXISTS over the index table of its type (`_id` and `_lastUpdated` are
        columns of `resource_current`), so filtering, counting and paging (`_count`, `_offset`)
        all happen in SQL. Order: the `_sort` keys (see `_sort_order`), then lastUpdated
        descending, then id, which is stable across pages while nothing is written
        (search.html#paging)."""
        where, order = search_terms(request)
        count = 0 if request.summary == "count" else request.count
        with reading(self._engine) as connection:
            total = connection.execute(select(func.count()).select_from(CURRENT).where(*where)).scalar_one()
            rows = (
                connection.execute(
                    select(VERSION.c.resource_json)
                    .join_from(CURRENT, VERSION, current_version_join())
                    .where(*where)
                    .order_by(*order)
                    .limit(count)
                    .offset(request.offset)
                ).all()
                if count
                else []
            )
        return [json.loads(row.resource_json) for row in rows], int(total)

    @staticmethod
    def sortable(resource_type: str) -> frozenset[str]:
        """The `_sort` keys (without `-`) `search` accepts for a type (for `parse_search`)."""
        return sortable_params(resource_type)

    # -- transactions spanning several writes ---------------------------------------------------

    def begin_transaction(self) -> Connection:
        """Open a write transaction for several interactions (see AMBIENT_TRANSACTION)."""
        return transactions.begin_transaction(self._engine)

    @staticmethod
    def end_transaction(connection: Connection, *, commit: bool) -> None:
        """Commit or roll back what `begin_transaction` opened."""
        transactions.end_transaction(connection, commit=commit)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All store interactions inside the block commit together or not at all."""
        with transactions.transaction(self._engine):
            yield
