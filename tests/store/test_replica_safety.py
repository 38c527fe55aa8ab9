"""The store's parts for replicas (ADR 0032) on SQLite and PostgreSQL: the schema upgrade run by
many processes at once on a fresh database, leases (exclusive, renewable, taken over once
expired, claimed without overlap) and expiring entries (single-use take, insert-once)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, text

from fhir_facade.auth.server.lockout import Lockout, LockoutPolicy
from fhir_facade.store import MIGRATIONS, create_store_engine, upgrade
from fhir_facade.store.expiring import ExpiringEntries
from fhir_facade.store.leases import Leases

PARALLEL = 8


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def at_once(count: int, work: Callable[[], object]) -> list[object]:
    """Run `work` in `count` threads released together; its results (exceptions re-raised)."""
    barrier = threading.Barrier(count)

    def run() -> object:
        barrier.wait()
        return work()

    with ThreadPoolExecutor(count) as pool:
        return [f.result() for f in [pool.submit(run) for _ in range(count)]]


def test_replicas_upgrading_a_fresh_database_at_once_all_succeed(engine: Engine) -> None:
    """Each thread has its own engine (its own connections), like a replica process. Before the
    fix, PostgreSQL failed one of them with DuplicateTable "schema_version"."""
    url = engine.url.render_as_string(hide_password=False)
    engines = [create_store_engine(url) for _ in range(PARALLEL)]
    waiting = list(engines)
    try:
        results = at_once(PARALLEL, lambda: upgrade(waiting.pop()))
    finally:
        for each in engines:
            each.dispose()
    assert results == [len(MIGRATIONS)] * PARALLEL
    with engine.connect() as connection:
        versions = connection.execute(text("SELECT version FROM schema_version ORDER BY version")).scalars()
        assert list(versions) == [m.version for m in MIGRATIONS]


@pytest.fixture
def clock() -> Clock:
    """A clock the test moves (instead of the store conftest's ticking one)."""
    return Clock()


def test_a_lease_has_one_holder_until_it_expires(engine: Engine, clock: Clock) -> None:
    upgrade(engine)
    a = Leases(engine, "replica-a", 3, clock=clock)
    b = Leases(engine, "replica-b", 3, clock=clock)
    assert a.acquire("watcher:feed")
    assert not b.acquire("watcher:feed")
    clock.advance(2)
    assert a.acquire("watcher:feed")  # renewed: 3 s from now
    clock.advance(2)
    assert not b.acquire("watcher:feed")
    assert b.holder_of("watcher:feed") == "replica-a"
    clock.advance(1.5)  # a stopped renewing: expired
    assert b.holder_of("watcher:feed") is None
    assert b.acquire("watcher:feed")
    assert not a.acquire("watcher:feed")  # the old holder cannot renew what was taken over
    a.release("watcher:feed")  # not a's: nothing happens
    assert a.holder_of("watcher:feed") == "replica-b"
    b.release("watcher:feed")
    assert a.acquire("watcher:feed")


def test_concurrent_acquires_of_a_free_lease_have_one_winner(engine: Engine) -> None:
    upgrade(engine)
    holders = [Leases(engine, f"replica-{n}", 30) for n in range(PARALLEL)]
    won = at_once(PARALLEL, lambda: holders.pop().acquire("analysis-task:race"))
    assert won.count(True) == 1


def test_expired_leases_are_claimed_once_each(engine: Engine, clock: Clock) -> None:
    upgrade(engine)
    dead = Leases(engine, "dead", 2, clock=clock)
    for n in range(10):
        assert dead.acquire(f"analysis-task:{n}")
    assert dead.acquire("watcher:feed")
    live = Leases(engine, "live", 2, clock=clock)
    assert live.claim_expired("analysis-task:", 10) == []  # not expired yet
    clock.advance(3)
    claimers = [Leases(engine, f"replica-{n}", 2, clock=clock) for n in range(4)]
    claimed = at_once(4, lambda: claimers.pop().claim_expired("analysis-task:", 4))
    names = [name for batch in claimed for name in batch]  # type: ignore[attr-defined]
    assert sorted(names) == sorted(f"analysis-task:{n}" for n in range(10))  # each once, none other
    assert live.claim_expired("analysis-task:", 10) == []  # all held again


def test_an_entry_is_taken_once(engine: Engine, clock: Clock) -> None:
    upgrade(engine)
    entries = ExpiringEntries(engine, clock=clock)
    entries.put("auth-code", "k", "v", clock.now + timedelta(seconds=60))
    taken = at_once(PARALLEL, lambda: entries.take("auth-code", "k"))
    assert taken.count("v") == 1 and taken.count(None) == PARALLEL - 1
    entries.put("auth-code", "old", "v", clock.now + timedelta(seconds=60))
    assert entries.count("auth-code") == 1
    clock.advance(61)
    assert entries.count("auth-code") == 0
    assert entries.take("auth-code", "old") is None  # expired


def test_an_entry_is_added_once_while_live(engine: Engine, clock: Clock) -> None:
    upgrade(engine)
    entries = ExpiringEntries(engine, clock=clock)
    until = clock.now + timedelta(seconds=10)
    added = at_once(PARALLEL, lambda: entries.add_if_absent("assertion-jti", "j", "", until))
    assert added.count(True) == 1
    clock.advance(11)
    assert entries.add_if_absent("assertion-jti", "j", "", clock.now + timedelta(seconds=10))


def test_lockout_counters_are_shared_by_replicas(engine: Engine) -> None:
    """Two Lockouts (two replicas' token endpoints) on one store count failures together (ADR 0011
    counters in `expiring_entry`): three failures spread over both lock the client at both."""
    upgrade(engine)
    seconds = [time.time()]
    entries = ExpiringEntries(engine, clock=lambda: datetime.fromtimestamp(seconds[0], UTC))
    rules = LockoutPolicy(
        failures=3, window=60, duration=10, max_duration=40, delay=0, max_delay=0, capacity=10
    )
    many = LockoutPolicy(
        failures=100, window=60, duration=10, max_duration=40, delay=0, max_delay=0, capacity=10
    )
    a, b = (Lockout("client", rules, many, clock=lambda: seconds[0], shared=entries) for _ in range(2))
    for replica in (a, b, a):
        attempt = replica.begin("backend", "192.0.2.7")
        assert not attempt.refused
        attempt.failed()
    refused = b.begin("backend", "192.0.2.7")
    assert refused.refused and refused.refused_by == ("client",) and refused.retry_after == 10
    assert a.begin("backend", "192.0.2.8").refused  # the client is locked, whatever its address
    seconds[0] += 11
    admitted = b.begin("backend", "192.0.2.7")
    assert not admitted.refused
    admitted.succeeded()  # resets the client's counter everywhere
    for replica in (a, b):
        attempt = replica.begin("backend", "192.0.2.7")
        attempt.failed()
    assert not a.begin("backend", "192.0.2.7").refused  # two failures since the reset: not locked
