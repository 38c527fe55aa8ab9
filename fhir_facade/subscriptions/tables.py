"""The tables of topic-based Subscriptions (created by migrations 7, 8 and 10, store/migrations.py)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, Text

from fhir_facade.store.schema import UtcDateTime

__all__ = ["EVENT", "STATE", "STUDY", "WS_TOKEN"]

_metadata = MetaData()

#: One row per Subscription: matching reads it, the event counter lives in it, delivery leases it.
STATE = Table(
    "subscription_state",
    _metadata,
    Column("subscription_id", String(64), primary_key=True),
    Column("topic", Text, nullable=False),
    Column("resource_type", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("author", Text),
    Column("resource_json", Text, nullable=False),
    Column("events_count", BigInteger, nullable=False),
    Column("delivered_through", BigInteger, nullable=False),
    Column("failures", Integer, nullable=False),
    Column("next_attempt_at", UtcDateTime(), nullable=False),
    Column("lease_until", UtcDateTime()),
    Column("last_error", Text),
    # Migration 8 (docs/adr/0028-websocket-channel.md).
    Column("channel", String(16), nullable=False, server_default="rest-hook"),
    Column("heartbeat_seconds", Integer),
    Column("last_sent_at", UtcDateTime()),
)

#: One durable row per (subscription, event number), written with the change that triggered it.
EVENT = Table(
    "subscription_event",
    _metadata,
    Column("subscription_id", String(64), primary_key=True),
    Column("event_number", BigInteger, primary_key=True),
    Column("resource_type", String(64), nullable=False),
    Column("resource_id", String(64), nullable=False),
    Column("version_id", Integer, nullable=False),
    Column("occurred_at", UtcDateTime(), nullable=False),
    #: The event trigger's code (`study-available`, `study-changed`); None for a resource trigger.
    Column("event_code", String(32)),
)

#: One row per study the change feed reported stable: what it held then (migration 10), so a
#: later StableStudy is told apart as a change or a replay (study_changes.py).
STUDY = Table(
    "subscription_study",
    _metadata,
    Column("study_uid", String(64), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("changes", Integer, nullable=False),
    Column("first_seen_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
)

#: The websocket binding tokens ($get-ws-binding-token), by SHA-256 of the token.
WS_TOKEN = Table(
    "subscription_ws_token",
    _metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("principal", Text),
    Column("subscriptions", Text, nullable=False),
    Column("expires_at", UtcDateTime(), nullable=False),
)
