"""The outbox remembers which request wrote each version (migration 5, outbox.correlation_id), on
SQLite and PostgreSQL, including a database upgraded from version 4 with rows already waiting;
AuditEvent is indexed by its R4 search parameters."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, text

from fhir_facade.correlation import correlation_scope
from fhir_facade.store import MIGRATIONS, ResourceStore, upgrade
from fhir_facade.store.migrations import current_version
from fhir_facade.sync.outbox_queue import OutboxQueue
from tests.outbox_store import store_with_outbox
from tests.store.conftest import TickingClock, search_request


def task() -> dict[str, object]:
    return {"resourceType": "Task", "status": "requested", "intent": "order"}


def later() -> datetime:
    return datetime.now(UTC) + timedelta(days=1)


def test_rows_carry_the_writing_request_id(store: ResourceStore, engine: Engine) -> None:
    queue = OutboxQueue(engine)
    with correlation_scope("req-1"):
        created = store.create(task())
    with correlation_scope("req-2"):
        store.update({**created, "status": "ready"})
    outside = store.create(task())  # no request: no id
    with correlation_scope("req-3"):
        queue.enqueue_snapshot("ImagingStudy", "1.2.3")
    rows = queue.lease(10, 30, now=later())
    assert [(r.resource_id, r.correlation_id) for r in rows] == [
        (created["id"], "req-1"),
        (created["id"], "req-2"),
        (outside["id"], None),
        ("1.2.3", "req-3"),
    ]
    queue.mark_dead([rows[0].seq], 1, "refused")
    ((dead, _),) = queue.dead_letters()
    assert dead.correlation_id == "req-1"


def test_upgrade_from_version_4_keeps_waiting_rows(engine: Engine, clock: TickingClock) -> None:
    upgrade(engine, MIGRATIONS[:4])
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO outbox (resource_type, resource_id, version_id, deleted, created_at, state,"
                " attempts, next_attempt_at) VALUES ('Task', 'old', 1, false, :now, 'pending', 0, :now)"
            ),
            {"now": datetime.now(UTC)},
        )
    assert upgrade(engine) == len(MIGRATIONS)
    assert upgrade(engine) == len(MIGRATIONS) == current_version(engine)
    store = store_with_outbox(engine, clock)
    with correlation_scope("req-new"):
        created = store.create(task())
    rows = OutboxQueue(engine).lease(10, 30, now=later())
    assert [(r.resource_id, r.correlation_id) for r in rows] == [("old", None), (created["id"], "req-new")]


def test_audit_events_are_indexed(store: ResourceStore) -> None:
    event = {
        "resourceType": "AuditEvent",
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": "read"}],
        "action": "R",
        "recorded": "2026-03-01T12:00:00.000+00:00",
        "outcome": "0",
        "agent": [
            {
                "who": {"identifier": {"value": "app"}},
                "requestor": True,
                "network": {"address": "10.0.0.1", "type": "2"},
            },
            {"who": {"reference": "Patient/P-9"}, "requestor": False},
        ],
        "source": {"observer": {"reference": "Device/facade"}},
        "entity": [{"what": {"reference": "Observation/o-1"}}, {"what": {"reference": "Patient/P-1"}}],
    }
    stored = store.create(event)
    queries: list[list[tuple[str, str]]] = [
        [("date", "2026-03-01")],
        [("type", "rest")],
        [("subtype", "http://hl7.org/fhir/restful-interaction|read")],
        [("action", "R")],
        [("outcome", "0")],
        [("agent", "Patient/P-9")],
        [("patient", "P-1")],
        [("patient", "P-9")],
        [("entity", "Observation/o-1")],
        [("source", "Device/facade")],
        [("address", "10.0.0.1")],
    ]
    for query in queries:
        matches, total = store.search(search_request("AuditEvent", query))
        assert total == 1 and matches[0]["id"] == stored["id"], query
    _, none = store.search(search_request("AuditEvent", [("patient", "o-1")]))
    assert none == 0, "patient only matches Patient references"
