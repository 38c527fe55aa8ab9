"""`ResourceStore`: the persistent FHIR resources (FHIR R4 http.html), on SQLite or PostgreSQL.

One method per interaction, synchronous (SQLAlchemy Core on a pooled Engine): the async app calls
them through `starlette.concurrency.run_in_threadpool` (anyio worker threads), see
docs/adr/0004-persistent-store.md. Resources are plain JSON dicts in and out (ADR 0001); every
write validates against `fhir.resources.R4B` first and runs in one database transaction that
writes the version, moves the current pointer and replaces the search index rows.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Table,
    and_,
    case,
    delete,
    false,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from fhir_facade.fhir.conditional_guard import CONDITIONAL_LOCK_SPACE, ConditionalGuard
from fhir_facade.fhir.errors import FhirError, bad_request, gone, not_found
from fhir_facade.fhir.ids import is_fhir_id
from fhir_facade.fhir.pipeline import EventBus, VersionStored
from fhir_facade.fhir.provider import WriteResult
from fhir_facade.fhir.required_bindings import check_required_bindings
from fhir_facade.fhir.search import (
    DateValue,
    ReferenceValue,
    SearchClause,
    SearchParamType,
    SearchRequest,
    StringValue,
    TokenValue,
)
from fhir_facade.store.authorship import WRITE_AUTHOR
from fhir_facade.store.engine import WRITE
from fhir_facade.store.errors import invalid_resource, version_conflict
from fhir_facade.store.indexing import (
    INDEXED_PARAMS,
    PRIORITY_RANK,
    PRIORITY_SORTED_PARAMS,
    IndexedParam,
    IndexRows,
    extract_index,
    normalize_string,
    sortable_params,
)
from fhir_facade.store.schema import (
    ResourceCurrent,
    ResourceVersion,
    SearchDate,
    SearchReference,
    SearchString,
    SearchToken,
)

__all__ = ["AMBIENT_TRANSACTION", "ResourceStore"]

#: The connection of an open multi-write transaction (a FHIR transaction Bundle). While set, every
#: read and write of the store runs on it, so the Bundle's entries see each other and commit or
#: roll back together. Context variables follow the request into worker threads (anyio copies
#: the context), which is how the async app's `atomic()` reaches the synchronous store.
AMBIENT_TRANSACTION: ContextVar[Connection | None] = ContextVar("facade_store_transaction", default=None)

_ETAG = re.compile(r'^(?:W/)?"?(\d+)"?$')
#: A write that loses a race for a new resource id (two update-as-create) is retried this often.
_WRITE_ATTEMPTS = 5

_version: Table = ResourceVersion.__table__  # type: ignore[attr-defined]
_current: Table = ResourceCurrent.__table__  # type: ignore[attr-defined]
_token: Table = SearchToken.__table__  # type: ignore[attr-defined]
_date: Table = SearchDate.__table__  # type: ignore[attr-defined]
_reference: Table = SearchReference.__table__  # type: ignore[attr-defined]
_string: Table = SearchString.__table__  # type: ignore[attr-defined]
_INDEX_TABLES = (_token, _date, _reference, _string)
_TABLE_BY_TYPE = {
    SearchParamType.TOKEN: _token,
    SearchParamType.DATE: _date,
    SearchParamType.REFERENCE: _reference,
    SearchParamType.STRING: _string,
}


def _instant(moment: datetime) -> str:
    """FHIR `instant` (datatypes.html#instant): offset required; microseconds kept so the text
    equals what the database holds."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _dumps(resource: dict[str, Any]) -> str:
    return json.dumps(resource, ensure_ascii=False, separators=(",", ":"))


def _deleted_stub(resource_type: str, resource_id: str, version: int, moment: datetime) -> dict[str, Any]:
    return {
        "resourceType": resource_type,
        "id": resource_id,
        "meta": {"versionId": str(version), "lastUpdated": _instant(moment)},
    }


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
        resource_type = self._check_type(resource)
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
        resource_type = self._check_type(resource)
        resource_id = resource.get("id")
        if not isinstance(resource_id, str) or not is_fhir_id(resource_id):
            raise bad_request("An update needs a valid resource id", expression=f"{resource_type}.id")
        stored, created = self._write(resource_type, resource_id, resource, if_match=if_match, guard=guard)
        return WriteResult(stored, created)

    def delete(self, resource_type: str, resource_id: str) -> None:
        """FHIR http.html#delete: record a deleted version; later reads answer 410. Idempotent:
        deleting a deleted or unknown resource changes nothing and succeeds (the spec allows
        200/204 for "nothing to delete")."""
        self._check_id(resource_type, resource_id)
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
            self._validate(
                resource_type, {**resource, "meta": {**resource.get("meta", {}), "versionId": "1"}}
            )
        expected = self._parse_etag(if_match) if if_match is not None else None
        ambient = AMBIENT_TRANSACTION.get()
        if ambient is not None:
            return self._write_in(ambient, resource_type, resource_id, resource, if_match, expected, guard)
        for attempt in range(_WRITE_ATTEMPTS):
            try:
                connection = self._engine.connect().execution_options(**{WRITE: True})
                with connection, connection.begin():
                    return self._write_in(
                        connection, resource_type, resource_id, resource, if_match, expected, guard
                    )
            except IntegrityError:
                # Another transaction created the same id between our SELECT and INSERT (only
                # possible for a new id: existing rows are locked). Retry sees its row.
                if attempt == _WRITE_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _write_in(
        self,
        connection: Connection,
        resource_type: str,
        resource_id: str,
        resource: dict[str, Any] | None,
        if_match: str | None,
        expected: int | None,
        guard: ConditionalGuard | None,
    ) -> tuple[dict[str, Any], bool]:
        if guard is not None:
            self._hold_condition(connection, guard)
        key = and_(_current.c.resource_type == resource_type, _current.c.resource_id == resource_id)
        # FOR UPDATE: concurrent writers of one resource queue here (PostgreSQL); SQLite's
        # BEGIN IMMEDIATE has already serialised all writers.
        row = connection.execute(
            select(_current.c.version_id, _current.c.deleted, _current.c.last_updated)
            .where(key)
            .with_for_update()
        ).first()
        if if_match is not None and (row is None or row.version_id != expected):
            raise version_conflict(resource_type, resource_id, if_match, row.version_id if row else None)
        if resource is None and (row is None or row.deleted):
            return {}, False  # idempotent delete
        version = row.version_id + 1 if row else 1
        moment = self._clock().astimezone(UTC)
        if row is not None and moment <= row.last_updated:
            moment = row.last_updated + timedelta(microseconds=1)  # lastUpdated never goes back
        if resource is None:
            stored = _deleted_stub(resource_type, resource_id, version, moment)
        else:
            meta = {**resource.get("meta", {}), "versionId": str(version), "lastUpdated": _instant(moment)}
            stored = {**resource, "meta": meta}
        connection.execute(
            insert(_version).values(
                resource_type=resource_type,
                resource_id=resource_id,
                version_id=version,
                last_updated=moment,
                deleted=resource is None,
                resource_json=_dumps(stored),
                author=WRITE_AUTHOR.get(),
            )
        )
        values = {"version_id": version, "last_updated": moment, "deleted": resource is None}
        if row is None:
            connection.execute(
                insert(_current).values(resource_type=resource_type, resource_id=resource_id, **values)
            )
        else:
            connection.execute(update(_current).where(key).values(**values))
        self._reindex(
            connection, resource_type, resource_id, extract_index(stored) if resource else IndexRows()
        )
        # What must commit or roll back with the version itself (the outbox row, ADR 0007).
        self.bus.precommit(
            connection, VersionStored(resource_type, resource_id, version, resource is None, stored, moment)
        )
        return stored, row is None

    def _hold_condition(self, connection: Connection, guard: ConditionalGuard) -> None:
        """Make a conditional write's search and write one atomic step (http.html#ccreate,
        #cond-update; docs/adr/0012): lock the criteria for the rest of this transaction, then
        search again; other matches than the search found raise `ConditionChanged` (nothing is
        written yet), and the caller starts over.

        PostgreSQL: a transaction-scoped advisory lock on (CONDITIONAL_LOCK_SPACE, hash of type
        and criteria), so identical conditional writes queue, in every process on the database,
        until the holder commits; the search after it is a new READ COMMITTED statement, which
        sees what the holder committed. SQLite: the transaction began with BEGIN IMMEDIATE (see
        `engine.WRITE`), the database's write lock, so no other writer runs until we commit."""
        if guard.request is None or guard.seen is None:
            raise RuntimeError(f"conditional write of {guard.resource_type} without its recorded search")
        if connection.dialect.name == "postgresql":
            connection.execute(select(func.pg_advisory_xact_lock(CONDITIONAL_LOCK_SPACE, guard.lock_key)))
        ids, total = self._match_ids(connection, guard.request)
        changed = guard.changed(ids, total)
        if changed is not None:
            raise changed

    @staticmethod
    def _reindex(connection: Connection, resource_type: str, resource_id: str, rows: IndexRows) -> None:
        for table in _INDEX_TABLES:
            connection.execute(
                delete(table).where(
                    table.c.resource_type == resource_type, table.c.resource_id == resource_id
                )
            )
        owner = {"resource_type": resource_type, "resource_id": resource_id}
        batches: list[tuple[Table, list[dict[str, Any]]]] = [
            (_token, [{**owner, "param": p, "system": s, "code": c} for p, s, c in rows.tokens]),
            (_date, [{**owner, "param": p, "lower": lo, "upper": up} for p, lo, up in rows.dates]),
            (
                _reference,
                [
                    {**owner, "param": p, "target_type": t, "target_id": i, "reference": r}
                    for p, t, i, r in rows.references
                ],
            ),
            (_string, [{**owner, "param": p, "normalized": n, "exact": e} for p, n, e in rows.strings]),
        ]
        for table, batch in batches:
            if batch:
                connection.execute(insert(table), batch)

    # -- reads --------------------------------------------------------------------------------

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """FHIR http.html#read: the current version; 404 if never stored, 410 if deleted."""
        self._check_id(resource_type, resource_id)
        with self._reading() as connection:
            row = connection.execute(
                select(_version.c.resource_json, _current.c.deleted)
                .join_from(_current, _version, self._current_version_join())
                .where(_current.c.resource_type == resource_type, _current.c.resource_id == resource_id)
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
        self._check_id(resource_type, resource_id)
        if not version_id.isdigit():
            return None
        with self._reading() as connection:
            author: str | None = connection.execute(
                select(_version.c.author).where(
                    _version.c.resource_type == resource_type,
                    _version.c.resource_id == resource_id,
                    _version.c.version_id == int(version_id),
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
        cls._validate(cls._check_type(resource), resource)

    def vread(self, resource_type: str, resource_id: str, version_id: str) -> dict[str, Any]:
        """FHIR http.html#vread: one version; 404 if it does not exist, 410 if that version is a
        deletion (the spec: "410 Gone" for a deleted version)."""
        self._check_id(resource_type, resource_id)
        # Versions are 1, 2, ...: only ASCII digits that fit the column's 64-bit integer can name one.
        if not (version_id.isascii() and version_id.isdigit()) or len(version_id) > 18:
            raise not_found(f"{resource_type}/{resource_id} has no version '{version_id}'")
        with self._reading() as connection:
            row = connection.execute(
                select(_version.c.resource_json, _version.c.deleted).where(
                    _version.c.resource_type == resource_type,
                    _version.c.resource_id == resource_id,
                    _version.c.version_id == int(version_id),
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
        with self._reading() as connection:
            for resource_type, wanted in by_type.items():
                rows = connection.execute(
                    select(_version.c.resource_id, _version.c.version_id, _version.c.resource_json).where(
                        _version.c.resource_type == resource_type,
                        _version.c.resource_id.in_({resource_id for resource_id, _ in wanted}),
                        _version.c.deleted.is_(False),
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
        self._check_id(resource_type, resource_id)
        where = (_version.c.resource_type == resource_type, _version.c.resource_id == resource_id)
        entries, total = self._history(where, (_version.c.version_id.desc(),), count, offset)
        if total == 0:
            raise not_found(f"{resource_type}/{resource_id} is not known")
        return entries, total

    def type_history(
        self, resource_type: str, *, count: int = 50, offset: int = 0
    ) -> tuple[list[dict[str, Any]], int]:
        """FHIR http.html#history (type level): every version of every resource of the type,
        newest first (lastUpdated, then id and version for a stable order), as (page, total)."""
        order = (_version.c.last_updated.desc(), _version.c.resource_id, _version.c.version_id.desc())
        return self._history((_version.c.resource_type == resource_type,), order, count, offset)

    def _history(
        self,
        where: Sequence[ColumnElement[bool]],
        order: Sequence[Any],
        count: int,
        offset: int,
    ) -> tuple[list[dict[str, Any]], int]:
        with self._reading() as connection:
            total = connection.execute(select(func.count()).select_from(_version).where(*where)).scalar_one()
            rows = connection.execute(
                select(_version.c.resource_json, _version.c.deleted)
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
        where, order = self._search_terms(request)
        count = 0 if request.summary == "count" else request.count
        with self._reading() as connection:
            total = connection.execute(select(func.count()).select_from(_current).where(*where)).scalar_one()
            rows = (
                connection.execute(
                    select(_version.c.resource_json)
                    .join_from(_current, _version, self._current_version_join())
                    .where(*where)
                    .order_by(*order)
                    .limit(count)
                    .offset(request.offset)
                ).all()
                if count
                else []
            )
        return [json.loads(row.resource_json) for row in rows], int(total)

    def _match_ids(self, connection: Connection, request: SearchRequest) -> tuple[list[str], int]:
        """`search` on `connection`, as ids of the page and the total (a conditional write's
        second look at its criteria). One statement: the total is a window count over the
        matches; only a page past the last match needs a second one."""
        where, order = self._search_terms(request)
        rows = connection.execute(
            select(_current.c.resource_id, func.count().over().label("total"))
            .where(*where)
            .order_by(*order)
            .limit(request.count)
            .offset(request.offset)
        ).all()
        if rows:
            return [row.resource_id for row in rows], int(rows[0].total)
        if request.offset == 0:
            return [], 0
        return [], int(
            connection.execute(select(func.count()).select_from(_current).where(*where)).scalar_one()
        )

    def _search_terms(self, request: SearchRequest) -> tuple[list[ColumnElement[bool]], list[Any]]:
        """WHERE and ORDER BY of a search on `resource_current`."""
        # The paging snapshot (request.snapshot, set by the provider on a first page and carried
        # by the paging links): resources written since are left out, so pages stay consistent
        # while rows are added (search.html#paging).
        snapshot = [_current.c.last_updated <= request.snapshot] if request.snapshot else []
        where = [
            _current.c.resource_type == request.resource_type,
            _current.c.deleted == false(),
            *snapshot,
            *(self._clause(request.resource_type, clause) for clause in request.clauses),
        ]
        order = [
            *self._sort_order(request.resource_type, request.sort),
            _current.c.last_updated.desc(),
            _current.c.resource_id,
        ]
        return where, order

    @staticmethod
    def sortable(resource_type: str) -> frozenset[str]:
        """The `_sort` keys (without `-`) `search` accepts for a type (for `parse_search`)."""
        return sortable_params(resource_type)

    def _sort_order(self, resource_type: str, keys: Sequence[str]) -> list[Any]:
        """ORDER BY terms for `_sort` (search.html#sort): `_id`, `_lastUpdated`, or an indexed
        token (code), date (ascending: earliest lower bound; descending: latest upper bound) or
        string (normalised) parameter. A resource with several values sorts by its smallest
        (ascending) or largest (descending) one; without a value it sorts last either way.
        Task and ServiceRequest `priority` sort in request-priority order, not by code text."""
        order: list[Any] = []
        sortable = sortable_params(resource_type)
        for key in keys:
            descending = key.startswith("-")
            name = key.removeprefix("-")
            if name not in sortable:
                raise bad_request(
                    f"_sort={name} is not supported for {resource_type}",
                    expression="_sort",
                    code="not-supported",
                )
            if name == "_id":
                column: Any = _current.c.resource_id
            elif name == "_lastUpdated":
                column = _current.c.last_updated
            else:
                indexed = self._indexed(resource_type, name)
                assert indexed is not None  # sortable names are indexed
                column = self._sort_value(indexed, descending)
            order.append(column.desc().nulls_last() if descending else column.asc().nulls_last())
        return order

    @staticmethod
    def _sort_value(indexed: IndexedParam, descending: bool) -> Any:
        """The correlated scalar subquery giving one resource's sort value for a parameter."""
        table = _TABLE_BY_TYPE[indexed.type]
        value: Any
        if indexed.type is SearchParamType.DATE:
            value = table.c.upper if descending else table.c.lower
        elif indexed.type is SearchParamType.STRING:
            value = table.c.normalized
        elif (indexed.resource_type, indexed.name) in PRIORITY_SORTED_PARAMS:
            value = case(PRIORITY_RANK, value=table.c.code, else_=None)
        else:
            value = table.c.code
        aggregate = func.max(value) if descending else func.min(value)
        return (
            select(aggregate)
            .where(
                table.c.resource_type == _current.c.resource_type,
                table.c.resource_id == _current.c.resource_id,
                table.c.param == indexed.name,
            )
            .correlate(_current)
            .scalar_subquery()
        )

    @staticmethod
    def _indexed(resource_type: str, name: str) -> IndexedParam | None:
        return {p.name: p for p in INDEXED_PARAMS.get(resource_type, ())}.get(name)

    def _clause(self, resource_type: str, clause: SearchClause) -> ColumnElement[bool]:
        name = clause.param.name
        if resource_type in INDEXED_PARAMS and name in ("_id", "_lastUpdated"):
            return self._resource_clause(clause)
        indexed = self._indexed(resource_type, name)
        if indexed is None or indexed.type is not clause.param.type:
            raise bad_request(
                f"Search parameter '{name}' is not supported for {resource_type}",
                expression=clause.raw_name,
                code="not-supported",
            )
        table = _TABLE_BY_TYPE[indexed.type]
        matches = [self._value_match(table, clause, value) for value in clause.values]
        # A non-correlated semi-join (IN), not a correlated EXISTS: without table statistics
        # SQLite ran the EXISTS once per resource through the (type, param, code) index, which
        # took seconds at 10k Tasks (bench/task_worklist.py); IN is computed once, on both engines.
        return _current.c.resource_id.in_(
            select(table.c.resource_id).where(
                table.c.resource_type == resource_type,
                table.c.param == name,
                or_(*matches),
            )
        )

    @staticmethod
    def _resource_clause(clause: SearchClause) -> ColumnElement[bool]:
        """`_id` (token: the logical id, comma = OR) and `_lastUpdated` (date: the instant of the
        current version, as the range [t, t + 1 µs)), on `resource_current` (search.html#all)."""
        if clause.param.name == "_id":
            wanted: list[str] = []
            for value in clause.values:
                if not isinstance(value, TokenValue) or value.system is not None or value.code is None:
                    raise bad_request(
                        f"'{clause.raw_name}' takes resource ids, got '{clause.raw_value}'",
                        expression=clause.raw_name,
                    )
                wanted.append(value.code)
            return _current.c.resource_id.in_(wanted)
        column = _current.c.last_updated
        matches: list[ColumnElement[bool]] = []
        for value in clause.values:
            if not isinstance(value, DateValue):
                raise AssertionError(f"unexpected search value {value!r}")
            matches.append(_instant_match(column, value))
        return or_(*matches)

    @staticmethod
    def _value_match(table: Table, clause: SearchClause, value: object) -> ColumnElement[bool]:
        c = table.c
        if isinstance(value, TokenValue):
            # search.html#token: `code` any system, `system|code`, `|code` no system, `system|`.
            conditions: list[ColumnElement[bool]] = []
            if value.system == "":
                conditions.append(c.system.is_(None))
            elif value.system is not None:
                conditions.append(c.system == value.system)
            if value.code is not None:
                conditions.append(c.code == value.code)
            return and_(*conditions) if conditions else c.code.is_not(None)
        if isinstance(value, ReferenceValue):
            if value.url is not None:
                return c.reference == value.url
            if value.id is None:
                raise bad_request(
                    f"'{clause.raw_name}' needs a reference (Type/id or id)",
                    expression=clause.raw_name,
                    code="not-supported",
                )
            if value.resource_type is not None:
                return and_(c.target_type == value.resource_type, c.target_id == value.id)
            return c.target_id == value.id
        if isinstance(value, DateValue):
            return _date_match(c.lower, c.upper, value)
        if isinstance(value, StringValue):
            # search.html#string: default = starts with, case- and accent-insensitive.
            if clause.modifier == "exact":
                return c.exact == value.value
            needle = normalize_string(value.value)
            if clause.modifier == "contains":
                return c.normalized.contains(needle, autoescape=True)
            return c.normalized.startswith(needle, autoescape=True)
        raise AssertionError(f"unexpected search value {value!r}")

    # -- plumbing -----------------------------------------------------------------------------

    @staticmethod
    def _current_version_join() -> ColumnElement[bool]:
        return and_(
            _version.c.resource_type == _current.c.resource_type,
            _version.c.resource_id == _current.c.resource_id,
            _version.c.version_id == _current.c.version_id,
        )

    # -- transactions spanning several writes ---------------------------------------------------

    def begin_transaction(self) -> Connection:
        """Open a write transaction for several interactions (see AMBIENT_TRANSACTION)."""
        connection = self._engine.connect().execution_options(**{WRITE: True})
        connection.begin()
        return connection

    @staticmethod
    def end_transaction(connection: Connection, *, commit: bool) -> None:
        try:
            if commit:
                connection.commit()
            else:
                connection.rollback()
        finally:
            connection.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All store interactions inside the block commit together or not at all."""
        connection = self.begin_transaction()
        token = AMBIENT_TRANSACTION.set(connection)
        try:
            yield
        except BaseException:
            AMBIENT_TRANSACTION.reset(token)
            self.end_transaction(connection, commit=False)
            raise
        AMBIENT_TRANSACTION.reset(token)
        self.end_transaction(connection, commit=True)

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        """The ambient transaction's connection (left open), else a fresh snapshot connection."""
        ambient = AMBIENT_TRANSACTION.get()
        if ambient is not None:
            yield ambient
            return
        with self._read_connection() as connection:
            yield connection

    def _read_connection(self) -> Connection:
        """A connection whose count and page see one snapshot: REPEATABLE READ on PostgreSQL
        (a SQLite read transaction is a snapshot already)."""
        connection = self._engine.connect()
        if connection.dialect.name == "postgresql":
            connection = connection.execution_options(isolation_level="REPEATABLE READ")
        return connection

    @staticmethod
    def _check_type(resource: dict[str, Any]) -> str:
        resource_type = resource.get("resourceType") if isinstance(resource, dict) else None
        if not isinstance(resource_type, str):
            raise bad_request("The body is not a FHIR resource (no resourceType)", expression="resourceType")
        return resource_type

    @staticmethod
    def _check_id(resource_type: str, resource_id: str) -> None:
        if not is_fhir_id(resource_id):
            raise not_found(f"{resource_type}/{resource_id} is not a valid resource id")

    @staticmethod
    def _validate(resource_type: str, resource: dict[str, Any]) -> None:
        """Basic FHIR validation (http.html#create: 400 on failure): the structure with the R4B
        models, then the required terminology bindings, which the models do not enforce
        (fhir/required_bindings.py, ADR 0015). Every write, the server's own included, comes here."""
        try:
            model = get_fhir_model_class(resource_type)
        except (ValueError, KeyError) as exc:
            raise bad_request(
                f"'{resource_type}' is not an R4 resource type",
                expression="resourceType",
                code="not-supported",
            ) from exc
        try:
            model.model_validate(resource)
        except ValidationError as exc:
            raise invalid_resource(resource_type, exc) from exc
        check_required_bindings(resource)

    @staticmethod
    def _parse_etag(if_match: str) -> int:
        match = _ETAG.match(if_match.strip())
        if not match:
            raise bad_request(
                f"If-Match must be an ETag like W/\"1\", got '{if_match}'", expression="If-Match"
            )
        digits = match.group(1)
        # More digits than a stored version (a 64-bit column) has: it names none (412), and int()
        # of thousands of digits would fail (the int string conversion limit).
        return int(digits) if len(digits) <= 18 else -1


def _utc_bounds(value: DateValue) -> tuple[datetime, datetime]:
    """The search range [lo, hi); a search value without an offset is taken as UTC."""
    lo, hi = value.lower, value.upper
    if lo.tzinfo is None:
        lo, hi = lo.replace(tzinfo=UTC), hi.replace(tzinfo=UTC)
    return lo, hi


def _date_match(lower: Any, upper: Any, value: DateValue) -> ColumnElement[bool]:
    """R4 search.html#prefix on ranges: the resource value covers [lower, upper), the search value
    [lo, hi). eq: contained; ne: not contained; gt/lt: the resource range reaches above/below
    the search range; ge/le: gt/lt or eq."""
    lo, hi = _utc_bounds(value)
    return _by_prefix(value, and_(lower >= lo, upper <= hi), upper > hi, lower < lo)


def _instant_match(column: Any, value: DateValue) -> ColumnElement[bool]:
    """`_date_match` for an instant t stored to the microsecond, i.e. the range [t, t + 1 µs):
    contained is lo <= t < hi, above is t >= hi, below is t < lo."""
    lo, hi = _utc_bounds(value)
    return _by_prefix(value, and_(column >= lo, column < hi), column >= hi, column < lo)


def _by_prefix(
    value: DateValue,
    contained: ColumnElement[bool],
    above: ColumnElement[bool],
    below: ColumnElement[bool],
) -> ColumnElement[bool]:
    by_prefix: dict[str, ColumnElement[bool]] = {
        "eq": contained,
        "ne": or_(below, above),
        "gt": above,
        "lt": below,
        "ge": or_(above, contained),
        "le": or_(below, contained),
    }
    if value.prefix not in by_prefix:
        raise bad_request(f"Date prefix '{value.prefix}' is not supported", code="not-supported")
    return by_prefix[value.prefix]
