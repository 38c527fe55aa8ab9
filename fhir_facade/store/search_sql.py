"""A typed `SearchRequest` -> SQL over the search index tables (FHIR R4 search.html): WHERE terms
per parameter type, `_id`/`_lastUpdated` on `resource_current`, `_sort` and the stable paging order.
The store runs what this builds; nothing here executes but `match_ids`."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Table, and_, case, false, func, or_, select

from fhir_facade.fhir.errors import bad_request
from fhir_facade.fhir.search import (
    DateValue,
    ReferenceValue,
    SearchClause,
    SearchParamType,
    SearchRequest,
    StringValue,
    TokenValue,
)
from fhir_facade.store.indexing import (
    INDEXED_PARAMS,
    PRIORITY_RANK,
    PRIORITY_SORTED_PARAMS,
    IndexedParam,
    normalize_string,
    sortable_params,
)
from fhir_facade.store.tables import CURRENT, TABLE_BY_TYPE

__all__ = ["match_ids", "search_terms"]


def search_terms(request: SearchRequest) -> tuple[list[ColumnElement[bool]], list[Any]]:
    """WHERE and ORDER BY of a search on `resource_current`."""
    # The paging snapshot (request.snapshot, set by the provider on a first page and carried
    # by the paging links): resources written since are left out, so pages stay consistent
    # while rows are added (search.html#paging).
    snapshot = [CURRENT.c.last_updated <= request.snapshot] if request.snapshot else []
    where = [
        CURRENT.c.resource_type == request.resource_type,
        CURRENT.c.deleted == false(),
        *snapshot,
        *(_clause(request.resource_type, clause) for clause in request.clauses),
    ]
    order = [
        *_sort_order(request.resource_type, request.sort),
        CURRENT.c.last_updated.desc(),
        CURRENT.c.resource_id,
    ]
    return where, order


def match_ids(connection: Connection, request: SearchRequest) -> tuple[list[str], int]:
    """`search` on `connection`, as ids of the page and the total (a conditional write's
    second look at its criteria). One statement: the total is a window count over the
    matches; only a page past the last match needs a second one."""
    where, order = search_terms(request)
    rows = connection.execute(
        select(CURRENT.c.resource_id, func.count().over().label("total"))
        .where(*where)
        .order_by(*order)
        .limit(request.count)
        .offset(request.offset)
    ).all()
    if rows:
        return [row.resource_id for row in rows], int(rows[0].total)
    if request.offset == 0:
        return [], 0
    return [], int(connection.execute(select(func.count()).select_from(CURRENT).where(*where)).scalar_one())


def _sort_order(resource_type: str, keys: Sequence[str]) -> list[Any]:
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
            column: Any = CURRENT.c.resource_id
        elif name == "_lastUpdated":
            column = CURRENT.c.last_updated
        else:
            indexed = _indexed(resource_type, name)
            assert indexed is not None  # sortable names are indexed
            column = _sort_value(indexed, descending)
        order.append(column.desc().nulls_last() if descending else column.asc().nulls_last())
    return order


def _sort_value(indexed: IndexedParam, descending: bool) -> Any:
    """The correlated scalar subquery giving one resource's sort value for a parameter."""
    table = TABLE_BY_TYPE[indexed.type]
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
            table.c.resource_type == CURRENT.c.resource_type,
            table.c.resource_id == CURRENT.c.resource_id,
            table.c.param == indexed.name,
        )
        .correlate(CURRENT)
        .scalar_subquery()
    )


def _indexed(resource_type: str, name: str) -> IndexedParam | None:
    return {p.name: p for p in INDEXED_PARAMS.get(resource_type, ())}.get(name)


def _clause(resource_type: str, clause: SearchClause) -> ColumnElement[bool]:
    name = clause.param.name
    if resource_type in INDEXED_PARAMS and name in ("_id", "_lastUpdated"):
        return _resource_clause(clause)
    indexed = _indexed(resource_type, name)
    if indexed is None or indexed.type is not clause.param.type:
        raise bad_request(
            f"Search parameter '{name}' is not supported for {resource_type}",
            expression=clause.raw_name,
            code="not-supported",
        )
    table = TABLE_BY_TYPE[indexed.type]
    matches = [_value_match(table, clause, value) for value in clause.values]
    # A non-correlated semi-join (IN), not a correlated EXISTS: without table statistics
    # SQLite ran the EXISTS once per resource through the (type, param, code) index, which
    # took seconds at 10k Tasks (bench/task_worklist.py); IN is computed once, on both engines.
    return CURRENT.c.resource_id.in_(
        select(table.c.resource_id).where(
            table.c.resource_type == resource_type,
            table.c.param == name,
            or_(*matches),
        )
    )


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
        return CURRENT.c.resource_id.in_(wanted)
    column = CURRENT.c.last_updated
    matches: list[ColumnElement[bool]] = []
    for value in clause.values:
        if not isinstance(value, DateValue):
            raise AssertionError(f"unexpected search value {value!r}")
        matches.append(_instant_match(column, value))
    return or_(*matches)


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
