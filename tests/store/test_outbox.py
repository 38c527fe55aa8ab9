"""The outbox on SQLite and PostgreSQL: rows commit and roll back with the write, leases keep one
worker per resource, and rows end sent, retried or dead."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine

from fhir_facade.fhir.errors import FhirError
from fhir_facade.store import ResourceStore
from fhir_facade.sync.outbox_queue import OutboxQueue
from tests.store.conftest import TickingClock


def task(status: str = "requested") -> dict[str, object]:
    return {"resourceType": "Task", "status": status, "intent": "order"}


def test_every_write_appends_a_row_in_its_transaction(store: ResourceStore, engine: Engine) -> None:
    queue = OutboxQueue(engine)
    created = store.create(task())
    store.update({**created, "status": "in-progress"})
    store.delete("Task", created["id"])
    rows = queue.lease(10, 30, now=datetime.now(UTC) + timedelta(days=1))
    assert [(r.resource_id, r.version_id, r.deleted) for r in rows] == [
        (created["id"], 1, False),
        (created["id"], 2, False),
        (created["id"], 3, True),
    ]


def test_a_rolled_back_write_leaves_no_row(store: ResourceStore, engine: Engine) -> None:
    queue = OutboxQueue(engine)
    with pytest.raises(FhirError), store.transaction():
        store.create(task())
        store.create({"resourceType": "Task", "status": "nonsense-without-intent"})
    assert queue.status().pending == 0


def test_without_an_upstream_no_rows_are_written(
    store: ResourceStore, engine: Engine, clock: TickingClock
) -> None:
    """(`store` upgrades the schema.)"""
    quiet = ResourceStore(engine, clock=clock)
    quiet.create(task())
    assert OutboxQueue(engine).status().pending == 0


def test_a_leased_resource_is_not_leased_again(store: ResourceStore, engine: Engine) -> None:
    queue = OutboxQueue(engine)
    a, b = store.create(task()), store.create(task())
    later = datetime.now(UTC) + timedelta(days=1)
    first = queue.lease(1, 30, now=later)
    assert {r.resource_id for r in first} == {a["id"]}
    store.update({**a, "status": "in-progress"})  # a new version of the leased resource
    second = queue.lease(10, 30, now=later)
    assert {r.resource_id for r in second} == {b["id"]}, "a's new row waits for a's lease"
    queue.mark_sent([r.seq for r in first])
    third = queue.lease(10, 30, now=later)
    assert [(r.resource_id, r.version_id) for r in third] == [(a["id"], 2)]


def test_an_expired_lease_is_leased_again(store: ResourceStore, engine: Engine) -> None:
    queue = OutboxQueue(engine)
    store.create(task())
    now = datetime.now(UTC) + timedelta(days=1)
    assert queue.lease(10, 30, now=now)
    assert queue.lease(10, 30, now=now + timedelta(seconds=10)) == []
    assert len(queue.lease(10, 30, now=now + timedelta(seconds=31))) == 1


def test_retry_dead_and_replay(store: ResourceStore, engine: Engine) -> None:
    queue = OutboxQueue(engine)
    store.create(task())
    store.create(task())
    now = datetime.now(UTC) + timedelta(days=1)
    one, two = queue.lease(10, 30, now=now)
    queue.retry_later([one.seq], 1, now + timedelta(seconds=60), "503")
    queue.mark_dead([two.seq], 1, '{"resourceType":"OperationOutcome"}')
    assert queue.lease(10, 30, now=now + timedelta(seconds=31)) == []
    assert [r.seq for r in queue.lease(10, 30, now=now + timedelta(seconds=61))] == [one.seq]
    status = queue.status()
    assert (status.pending, status.dead) == (1, 1)
    (dead, error) = queue.dead_letters()[0]
    assert dead.seq == two.seq and error and "OperationOutcome" in error
    assert queue.replay_dead(now=now) == 1
    assert queue.status().dead == 0


def test_concurrent_workers_never_lease_the_same_row(store: ResourceStore, engine: Engine) -> None:
    """Two workers (threads, each its own lease transactions) drain 40 resources: every row goes
    to exactly one of them (PostgreSQL: the advisory-locked lease; SQLite: its single writer)."""
    from concurrent.futures import ThreadPoolExecutor

    for _ in range(40):
        store.create(task())
    queue = OutboxQueue(engine)
    later = datetime.now(UTC) + timedelta(days=1)

    def drain() -> list[int]:
        mine: list[int] = []
        while rows := queue.lease(3, 30, now=later):
            mine += [r.seq for r in rows]
            queue.mark_sent([r.seq for r in rows])
        return mine

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: drain(), range(2))
    assert not set(first) & set(second)
    assert len(first) + len(second) == 40
    assert queue.status().pending == 0


def test_backoff_grows_is_capped_and_honours_retry_after() -> None:
    from fhir_facade.sync.worker import SyncWorker

    worker = SyncWorker(None, None, None, None, backoff_base=1.0, backoff_cap=8.0)  # type: ignore[arg-type]
    assert all(0 <= worker.backoff(1, None) <= 1.0 for _ in range(50))
    assert all(0 <= worker.backoff(10, None) <= 8.0 for _ in range(50))
    assert max(worker.backoff(4, None) for _ in range(200)) > 4.0  # jitter spans the range
    assert all(worker.backoff(1, 5.0) >= 5.0 for _ in range(50))
