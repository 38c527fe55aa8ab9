"""The lockout counters alone (fhir_facade/auth/server/lockout.py), on a hand-driven clock: windows,
growing lockouts and delays, and the bounds that keep an attacker from exhausting memory."""

from __future__ import annotations

import pytest

from fhir_facade.auth.server.lockout import Attempt, Lockout, LockoutPolicy, lockouts_from_settings
from fhir_facade.config import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def policy(**overrides: float) -> LockoutPolicy:
    values: dict[str, float] = {
        "failures": 3,
        "window": 60,
        "duration": 10,
        "max_duration": 25,
        "delay": 0.5,
        "max_delay": 1.5,
        "capacity": 100,
    }
    values.update(overrides)
    return LockoutPolicy(**values)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def lockout(clock: Clock) -> Lockout:
    return Lockout("user", policy(), policy(failures=100), clock=clock)


def fail(lockout: Lockout, user: str, address: str = "192.0.2.1") -> Attempt:
    attempt = lockout.begin(user, address)
    assert not attempt.refused
    attempt.failed()
    return attempt


def test_failures_outside_the_window_do_not_count(lockout: Lockout, clock: Clock) -> None:
    fail(lockout, "u")
    fail(lockout, "u")
    clock.now += 61
    fail(lockout, "u")
    fail(lockout, "u")
    assert not lockout.begin("u", "192.0.2.1").refused


def test_lockouts_grow_for_repeat_offenders_up_to_the_maximum(lockout: Lockout, clock: Clock) -> None:
    seconds = []
    for _ in range(3):
        attempts = [fail(lockout, "u") for _ in range(3)]
        (locked,) = attempts[-1].locked
        seconds.append(locked.seconds)
        refused = lockout.begin("u", "192.0.2.1")
        assert refused.retry_after == locked.seconds and refused.refused_by == ("user",)
        clock.now += locked.seconds
    assert seconds == [10, 20, 25]


def test_the_delay_grows_with_each_failure_and_stops_at_the_lockout(lockout: Lockout) -> None:
    delays = [fail(lockout, "u").delay for _ in range(3)]
    assert delays == [0.5, 1.0, 0.0]


def test_a_success_resets_the_principal_but_not_the_address(clock: Clock) -> None:
    lockout = Lockout("user", policy(), policy(failures=4), clock=clock)
    fail(lockout, "u")
    fail(lockout, "u")
    lockout.begin("u", "192.0.2.1").succeeded()
    fail(lockout, "u")
    last = fail(lockout, "u")
    assert last.failures == (2, 4)
    assert [locked.kind for locked in last.locked] == ["address"]


def test_a_failure_that_concerns_only_the_address(lockout: Lockout) -> None:
    attempt = lockout.begin("public-app", "192.0.2.1")
    attempt.failed(principal=False)
    assert attempt.failures == (0, 1)
    assert lockout.tracked() == (0, 1)


def test_attempts_in_flight_use_up_the_budget(lockout: Lockout) -> None:
    admitted = [lockout.begin("u", "192.0.2.1") for _ in range(3)]
    assert all(not attempt.refused for attempt in admitted)
    extra = lockout.begin("u", "192.0.2.1")
    assert extra.refused and extra.retry_after == 1
    for attempt in admitted:
        attempt.close()  # answered without a password check: the budget is back
    assert lockout.tracked() == (0, 0)
    assert not lockout.begin("u", "192.0.2.1").refused


def test_memory_is_bounded_by_capacity_and_expiry(clock: Clock) -> None:
    lockout = Lockout("user", policy(capacity=50), policy(failures=10**6, capacity=50), clock=clock)
    for index in range(1000):
        fail(lockout, f"random-{index}", f"10.0.{index // 256}.{index % 256}")
    assert lockout.tracked() == (50, 50)
    clock.now += 61
    fail(lockout, "latest")
    assert lockout.tracked() == (1, 1)


def test_a_full_table_keeps_locks_over_mere_failures(clock: Clock) -> None:
    lockout = Lockout("user", policy(capacity=10), policy(failures=10**6), clock=clock)
    for _ in range(3):
        fail(lockout, "victim")
    for index in range(30):
        fail(lockout, f"random-{index}")
    assert lockout.begin("victim", "192.0.2.9").refused


def test_huge_names_are_stored_as_hashes(lockout: Lockout) -> None:
    name = "x" * 100_000
    for _ in range(3):
        fail(lockout, name)
    refused = lockout.begin(name, "192.0.2.2")
    assert refused.refused and refused.principal == name
    assert all(len(key) < 100 for key in refused.keys)


def test_settings_make_two_lockouts_with_independent_budgets() -> None:
    sign_in, token = lockouts_from_settings(
        Settings(auth_lockout_failures=2, auth_lockout_address_failures=9)
    )
    for _ in range(2):
        sign_in.begin("same", "192.0.2.3").failed()
    assert sign_in.begin("same", "192.0.2.3").refused_by == ("user",)
    assert not token.begin("same", "192.0.2.3").refused


def test_policy_names_a_bad_value() -> None:
    with pytest.raises(ValueError, match="max_duration"):
        policy(duration=100, max_duration=10)
    with pytest.raises(ValueError, match="failures"):
        policy(failures=0)
