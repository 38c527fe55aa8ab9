"""Writing one version of a resource (FHIR R4 http.html#create, #update, #delete) on a connection:
the version row, the current pointer, the search index rows, and the pre-commit event; and the
conditional write's second look at its criteria under a lock (docs/adr/0012)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Table, and_, delete, func, insert, select, update

from fhir_facade.fhir.conditional_guard import CONDITIONAL_LOCK_SPACE, ConditionalGuard
from fhir_facade.fhir.pipeline import EventBus, VersionStored
from fhir_facade.store.authorship import WRITE_AUTHOR
from fhir_facade.store.errors import version_conflict
from fhir_facade.store.indexing import IndexRows, extract_index
from fhir_facade.store.search_sql import match_ids
from fhir_facade.store.tables import CURRENT, DATE, INDEX_TABLES, REFERENCE, STRING, TOKEN, VERSION

__all__ = ["hold_condition", "reindex", "write_version"]


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


def write_version(
    connection: Connection,
    resource_type: str,
    resource_id: str,
    resource: dict[str, Any] | None,
    if_match: str | None,
    expected: int | None,
    guard: ConditionalGuard | None,
    *,
    clock: Callable[[], datetime],
    bus: EventBus,
) -> tuple[dict[str, Any], bool]:
    """Write one version of a resource (None: a deletion) on `connection`, inside its
    transaction: the version row, the current pointer and the search index rows, then the
    pre-commit `VersionStored` on `bus`. `expected` is the version `if_match` names."""
    if guard is not None:
        hold_condition(connection, guard)
    key = and_(CURRENT.c.resource_type == resource_type, CURRENT.c.resource_id == resource_id)
    # FOR UPDATE: concurrent writers of one resource queue here (PostgreSQL); SQLite's
    # BEGIN IMMEDIATE has already serialised all writers.
    row = connection.execute(
        select(CURRENT.c.version_id, CURRENT.c.deleted, CURRENT.c.last_updated).where(key).with_for_update()
    ).first()
    if if_match is not None and (row is None or row.version_id != expected):
        raise version_conflict(resource_type, resource_id, if_match, row.version_id if row else None)
    if resource is None and (row is None or row.deleted):
        return {}, False  # idempotent delete
    version = row.version_id + 1 if row else 1
    moment = clock().astimezone(UTC)
    if row is not None and moment <= row.last_updated:
        moment = row.last_updated + timedelta(microseconds=1)  # lastUpdated never goes back
    if resource is None:
        stored = _deleted_stub(resource_type, resource_id, version, moment)
    else:
        meta = {**resource.get("meta", {}), "versionId": str(version), "lastUpdated": _instant(moment)}
        stored = {**resource, "meta": meta}
    connection.execute(
        insert(VERSION).values(
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
            insert(CURRENT).values(resource_type=resource_type, resource_id=resource_id, **values)
        )
    else:
        connection.execute(update(CURRENT).where(key).values(**values))
    reindex(connection, resource_type, resource_id, extract_index(stored) if resource else IndexRows())
    # What must commit or roll back with the version itself (the outbox row, ADR 0007).
    bus.precommit(
        connection, VersionStored(resource_type, resource_id, version, resource is None, stored, moment)
    )
    return stored, row is None


def hold_condition(connection: Connection, guard: ConditionalGuard) -> None:
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
    ids, total = match_ids(connection, guard.request)
    changed = guard.changed(ids, total)
    if changed is not None:
        raise changed


def reindex(connection: Connection, resource_type: str, resource_id: str, rows: IndexRows) -> None:
    for table in INDEX_TABLES:
        connection.execute(
            delete(table).where(table.c.resource_type == resource_type, table.c.resource_id == resource_id)
        )
    owner = {"resource_type": resource_type, "resource_id": resource_id}
    batches: list[tuple[Table, list[dict[str, Any]]]] = [
        (TOKEN, [{**owner, "param": p, "system": s, "code": c} for p, s, c in rows.tokens]),
        (DATE, [{**owner, "param": p, "lower": lo, "upper": up} for p, lo, up in rows.dates]),
        (
            REFERENCE,
            [
                {**owner, "param": p, "target_type": t, "target_id": i, "reference": r}
                for p, t, i, r in rows.references
            ],
        ),
        (STRING, [{**owner, "param": p, "normalized": n, "exact": e} for p, n, e in rows.strings]),
    ]
    for table, batch in batches:
        if batch:
            connection.execute(insert(table), batch)
