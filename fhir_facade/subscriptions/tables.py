"""The tables of topic-based Subscriptions (created by migrations 7 and 8, store/migrations.py)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, Text

from fhir_facade.store.schema import UtcDateTime

__all__ = ["EVENT", "STATE", "WS_TOKEN"]

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
    #: The arrival a study-available event records (migration 9), NULL for stored resources' events.
    Column("arrival", String(128)),
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
