"""The websocket binding tokens and the heartbeat claims on SQLite and PostgreSQL
(docs/adr/0028-websocket-channel.md): what several replicas rely on (a token issued by one is
redeemed by another; one replica wins each rest-hook heartbeat) is database behaviour, tested on
both databases with explicit instants instead of waiting."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, insert, select, text, update

from fhir_facade.store import create_store_engine, upgrade
from fhir_facade.subscriptions.binding_tokens import BindingTokens
from fhir_facade.subscriptions.channel_state import ChannelStates
from fhir_facade.subscriptions.tables import STATE, WS_TOKEN
from tests.store.conftest import postgres_database  # noqa: F401  (a fixture)

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        engine = create_store_engine(f"sqlite:///{tmp_path / 'store.db'}")
    else:
        engine = create_store_engine(request.getfixturevalue("postgres_database"))
        with engine.begin() as connection:
            connection.execute(text("DROP SCHEMA public CASCADE"))
            connection.execute(text("CREATE SCHEMA public"))
    upgrade(engine)
    yield engine
    engine.dispose()


def test_a_token_is_stored_hashed_redeemed_until_it_expires_and_then_purged(engine: Engine) -> None:
    tokens = BindingTokens(engine, 60)
    token, expires = tokens.issue('{"client_id":"app"}', ("s1", "s2"), now=NOW)
    assert expires == NOW + timedelta(seconds=60)

    other_replica = BindingTokens(engine, 60)  # a socket may reach another replica
    binding = other_replica.redeem(token, now=NOW + timedelta(seconds=59))
    assert binding is not None
    assert binding.principal == '{"client_id":"app"}' and binding.subscriptions == ("s1", "s2")
    assert other_replica.redeem(f" {token}\n", now=NOW) is not None  # as a message may carry it
    assert other_replica.redeem(token, now=NOW + timedelta(seconds=60)) is None  # expired
    assert other_replica.redeem("not-" + token, now=NOW) is None

    with engine.connect() as connection:
        stored = [tuple(map(str, row)) for row in connection.execute(select(WS_TOKEN)).all()]
    assert len(stored) == 1 and all(token not in value for value in stored[0])  # only its digest

    tokens.issue(None, ("s3",), now=NOW + timedelta(seconds=61))  # purges the expired one
    with engine.connect() as connection:
        assert [r.subscriptions for r in connection.execute(select(WS_TOKEN)).all()] == ['["s3"]']


def _subscription(engine: Engine, subscription_id: str, **values: object) -> None:
    row = {
        "subscription_id": subscription_id,
        "topic": "http://example.org/topic",
        "resource_type": "Task",
        "status": "active",
        "author": None,
        "resource_json": "{}",
        "events_count": 0,
        "delivered_through": 0,
        "failures": 0,
        "next_attempt_at": NOW,
        "channel": "rest-hook",
        "heartbeat_seconds": 5,
        **values,
    }
    with engine.begin() as connection:
        connection.execute(insert(STATE).values(**row))


def test_one_claim_wins_each_heartbeat_and_only_quiet_active_rest_hooks_are_due(engine: Engine) -> None:
    states = ChannelStates(engine)
    _subscription(engine, "beats")
    _subscription(engine, "no-period", heartbeat_seconds=None)
    _subscription(engine, "pending", events_count=3, delivered_through=2)
    _subscription(engine, "socket", channel="websocket")
    _subscription(engine, "failing", status="error")

    (due,) = states.heartbeats_due(NOW)
    assert due.subscription_id == "beats"
    assert states.claim_heartbeat(due, NOW)
    assert not states.claim_heartbeat(due, NOW)  # a second replica with the same view loses
    assert states.heartbeats_due(NOW + timedelta(seconds=4)) == []
    (again,) = states.heartbeats_due(NOW + timedelta(seconds=5))
    with engine.begin() as connection:  # a delivery worker holds the lease
        connection.execute(update(STATE).values(lease_until=NOW + timedelta(seconds=60)))
    assert not states.claim_heartbeat(again, NOW + timedelta(seconds=5))
    with engine.begin() as connection:
        connection.execute(update(STATE).values(lease_until=None))
    assert states.claim_heartbeat(again, NOW + timedelta(seconds=5))


def test_sockets_raise_delivered_through_never_lower_it(engine: Engine) -> None:
    states = ChannelStates(engine)
    _subscription(engine, "ws", channel="websocket", events_count=9)
    states.sent_on_socket("ws", 7, NOW)
    states.sent_on_socket("ws", 4, NOW + timedelta(seconds=1))  # a socket bound earlier, behind
    state = states.get("ws")
    assert state is not None
    assert state.delivered_through == 7 and state.last_sent_at == NOW + timedelta(seconds=1)
    states.sent_on_socket("ws", None, NOW + timedelta(seconds=2))  # a heartbeat or a handshake
    state = states.get("ws")
    assert state is not None and state.delivered_through == 7
