"""The delivery queue's leases on SQLite and PostgreSQL (fhir_facade/subscriptions/queue.py): two
workers leasing at once take disjoint subscriptions; a lease is the fencing token of its progress
writes, so a worker whose lease ran out and was taken over writes nothing."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, insert, select

from fhir_facade.store import create_store_engine, upgrade
from fhir_facade.subscriptions.queue import Progress, SubscriptionQueue
from fhir_facade.subscriptions.tables import STATE

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    else:
        url = request.getfixturevalue("postgres_url")
    engine = create_store_engine(url)
    upgrade(engine)
    with engine.begin() as connection:
        for n in range(40):
            connection.execute(
                insert(STATE).values(
                    subscription_id=f"s{n:02d}",
                    topic="t",
                    resource_type="Task",
                    status="active",
                    resource_json="{}",
                    events_count=1,
                    delivered_through=0,
                    failures=0,
                    next_attempt_at=NOW - timedelta(seconds=1),
                )
            )
    yield engine
    engine.dispose()


def test_workers_leasing_at_once_take_disjoint_subscriptions(engine: Engine) -> None:
    queue = SubscriptionQueue(engine)
    taken: list[list[str]] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        barrier.wait()
        mine: list[str] = []
        for _ in range(5):
            mine += [item.subscription_id for item in queue.lease(3, 60, NOW)]
        taken.append(mine)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    everything = [s for mine in taken for s in mine]
    assert len(everything) == len(set(everything)) == 40  # each leased once, all of them
    assert queue.lease(10, 60, NOW) == []  # nothing is due while leased


def test_an_expired_lease_taken_over_cannot_write_progress(engine: Engine) -> None:
    queue = SubscriptionQueue(engine)
    (first,) = [s for s in queue.lease(40, 5, NOW) if s.subscription_id == "s00"]
    later = NOW + timedelta(seconds=10)  # the first worker stalled past its lease
    (second,) = [s for s in queue.lease(40, 60, later) if s.subscription_id == "s00"]
    assert second.lease_until != first.lease_until

    stale, current = queue.apply(
        [
            Progress("s00", first.lease_until, {"delivered_through": 1, "lease_until": None}),
            Progress("s00", second.lease_until, {"failures": 3}),
        ]
    )
    assert (stale, current) == (False, True)
    with engine.connect() as connection:
        row = connection.execute(select(STATE).where(STATE.c.subscription_id == "s00")).one()
    assert row.delivered_through == 0 and row.failures == 3  # the stale write changed nothing
    assert row.lease_until is not None
