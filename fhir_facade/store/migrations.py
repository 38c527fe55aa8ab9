"""Versioned schema upgrades: an ordered list of migrations and a `schema_version` table.

`upgrade(engine)` applies, in order and each in its own transaction, the migrations whose
version is above the highest recorded one, so it is idempotent and safe to call at every start.
On PostgreSQL a transaction-scoped advisory lock serialises replicas that start together, from the
creation of `schema_version` itself on (two replicas creating it at once would otherwise both
pass the existence check and one fail with DuplicateTable, docs/adr/0032); on SQLite the write
transaction (BEGIN IMMEDIATE) does the same. See docs/adr/0004-persistent-store.md
for why this is not Alembic (yet).

Rule for new migrations: append, never edit an applied one; write the DDL explicitly (not
`create_all` of the current models), because the models will have moved on when an old
database upgrades through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, func, insert, inspect, select, text
from sqlmodel import SQLModel

from fhir_facade.store.engine import WRITE
from fhir_facade.store.schema import (
    ResourceCurrent,
    ResourceVersion,
    SchemaVersion,
    SearchDate,
    SearchReference,
    SearchString,
    SearchToken,
)

__all__ = ["MIGRATIONS", "Migration", "current_version", "upgrade"]

#: Arbitrary constant key for pg_advisory_xact_lock: "fhir" in ASCII.
_ADVISORY_LOCK_KEY = 0x66686972


@dataclass(frozen=True)
class Migration:
    """One schema step: `apply` runs inside the transaction that records `version`."""

    version: int
    description: str
    apply: Callable[[Connection], None]


def _initial_schema(connection: Connection) -> None:
    # Version 1 is the schema as first designed, created from the models; columns the models gained
    # later (resource_version.author, migration 6) come with it, and their migration skips them.
    tables = [
        ResourceVersion.__table__,  # type: ignore[attr-defined]
        ResourceCurrent.__table__,  # type: ignore[attr-defined]
        SearchToken.__table__,  # type: ignore[attr-defined]
        SearchDate.__table__,  # type: ignore[attr-defined]
        SearchReference.__table__,  # type: ignore[attr-defined]
        SearchString.__table__,  # type: ignore[attr-defined]
    ]
    SQLModel.metadata.create_all(connection, tables=tables)


def _feed_positions(connection: Connection) -> None:
    connection.execute(
        text(
            "CREATE TABLE feed_position ("
            " name VARCHAR(64) PRIMARY KEY,"
            " position BIGINT NOT NULL,"
            " updated_at TIMESTAMP WITH TIME ZONE NOT NULL)"
        )
    )


def _owner_indexes_with_param(connection: Connection) -> None:
    # _sort reads one parameter's values per matching resource (a correlated subquery on
    # resource_type, resource_id, param); with `param` in the owner index that is one index
    # probe, where SQLite otherwise scanned the (type, param, code) index per resource.
    # The sort column ends the date and string indexes, so min() is read from the owner index too
    # (else SQLite's min/max shortcut prefers the lookup index, which starts with the same
    # equality columns but not the resource).
    columns = {
        "search_token": "resource_type, resource_id, param",
        "search_date": "resource_type, resource_id, param, lower",
        "search_reference": "resource_type, resource_id, param",
        "search_string": "resource_type, resource_id, param, normalized",
    }
    for table, indexed in columns.items():
        connection.execute(text(f"DROP INDEX IF EXISTS ix_{table}_owner"))
        connection.execute(text(f"CREATE INDEX ix_{table}_owner ON {table} ({indexed})"))


def _outbox(connection: Connection) -> None:
    # One row per stored version, written in the same transaction as the version: what the sync
    # worker pushes upstream (docs/adr/0007-upstream-sync.md). `seq` orders the rows.
    postgres = connection.dialect.name == "postgresql"
    seq = "seq BIGSERIAL PRIMARY KEY" if postgres else "seq INTEGER PRIMARY KEY AUTOINCREMENT"
    stamp = "TIMESTAMP WITH TIME ZONE"
    connection.execute(
        text(
            f"CREATE TABLE outbox ({seq},"
            " resource_type VARCHAR(64) NOT NULL,"
            " resource_id VARCHAR(64) NOT NULL,"
            " version_id INTEGER NOT NULL,"
            " deleted BOOLEAN NOT NULL,"
            f" created_at {stamp} NOT NULL,"
            " state VARCHAR(16) NOT NULL,"
            " attempts INTEGER NOT NULL,"
            f" next_attempt_at {stamp} NOT NULL,"
            f" lease_until {stamp},"
            f" sent_at {stamp},"
            " last_error TEXT)"
        )
    )
    connection.execute(text("CREATE INDEX ix_outbox_due ON outbox (state, next_attempt_at, seq)"))
    connection.execute(text("CREATE INDEX ix_outbox_resource ON outbox (resource_type, resource_id, seq)"))


def _outbox_correlation(connection: Connection) -> None:
    # The correlation id (X-Correlation-ID) of the request that wrote the version, sent on the
    # upstream request that delivers it. Nullable: rows written before this migration, and
    # writes outside any request, have none. ADD COLUMN is the same on SQLite and PostgreSQL.
    connection.execute(text("ALTER TABLE outbox ADD COLUMN correlation_id VARCHAR(128)"))


def _version_author(connection: Connection) -> None:
    # The principal (client, user, grants) that wrote each version, so work done later on its behalf
    # runs with its rights (ADR 0009). Nullable: older versions and the server's own writes have none.
    if "author" not in {c["name"] for c in inspect(connection).get_columns("resource_version")}:
        connection.execute(text("ALTER TABLE resource_version ADD COLUMN author TEXT"))


def _subscription_events(connection: Connection) -> None:
    # Topic-based Subscriptions (docs/adr/0026-subscriptions-design.md). `subscription_state`: one
    # row per Subscription, written with each of its versions: what matching reads (by the topic's
    # resource type) and the per-subscription event counter, incremented in the transaction that
    # writes the event, so event numbers have no gaps; delivery progress and the delivery lease.
    # `subscription_event`: one durable row per (subscription, event number), written in the
    # transaction of the change that triggered it (like the outbox, ADR 0007).
    stamp = "TIMESTAMP WITH TIME ZONE"
    connection.execute(
        text(
            "CREATE TABLE subscription_state ("
            " subscription_id VARCHAR(64) PRIMARY KEY,"
            " topic TEXT NOT NULL,"
            " resource_type VARCHAR(64) NOT NULL,"
            " status VARCHAR(16) NOT NULL,"
            " author TEXT,"
            " resource_json TEXT NOT NULL,"
            " events_count BIGINT NOT NULL,"
            " delivered_through BIGINT NOT NULL,"
            " failures INTEGER NOT NULL,"
            f" next_attempt_at {stamp} NOT NULL,"
            f" lease_until {stamp},"
            " last_error TEXT)"
        )
    )
    connection.execute(
        text("CREATE INDEX ix_subscription_state_type ON subscription_state (resource_type, status)")
    )
    connection.execute(
        text(
            "CREATE TABLE subscription_event ("
            " subscription_id VARCHAR(64) NOT NULL,"
            " event_number BIGINT NOT NULL,"
            " resource_type VARCHAR(64) NOT NULL,"
            " resource_id VARCHAR(64) NOT NULL,"
            " version_id INTEGER NOT NULL,"
            f" occurred_at {stamp} NOT NULL,"
            " PRIMARY KEY (subscription_id, event_number))"
        )
    )


def _subscription_channels(connection: Connection) -> None:
    # The websocket channel and heartbeats (docs/adr/0028-websocket-channel.md). On
    # `subscription_state`: the channel type (the rest-hook worker leases only its own), the
    # heartbeat period and when a notification last went out (rest-hook heartbeats are claimed on it
    # by a conditional UPDATE, so one replica sends each). `subscription_ws_token`: the binding
    # tokens of $get-ws-binding-token, by SHA-256 (a database read gives no usable token), so a
    # socket may reach any replica.
    stamp = "TIMESTAMP WITH TIME ZONE"
    columns = {c["name"] for c in inspect(connection).get_columns("subscription_state")}
    for name, kind in (
        ("channel", "VARCHAR(16) NOT NULL DEFAULT 'rest-hook'"),
        ("heartbeat_seconds", "INTEGER"),
        ("last_sent_at", stamp),
    ):
        if name not in columns:
            connection.execute(text(f"ALTER TABLE subscription_state ADD COLUMN {name} {kind}"))
    connection.execute(
        text(
            "CREATE TABLE subscription_ws_token ("
            " token_hash VARCHAR(64) PRIMARY KEY,"
            " principal TEXT,"
            " subscriptions TEXT NOT NULL,"
            f" expires_at {stamp} NOT NULL)"
        )
    )
    connection.execute(
        text("CREATE INDEX ix_subscription_ws_token_expiry ON subscription_ws_token (expires_at)")
    )


def _study_changes(connection: Connection) -> None:
    # The study topic's "available" versus "changed" (docs/adr/0026-subscriptions-design.md,
    # addendum): `subscription_study` keeps, per study the change feed reported stable, a
    # fingerprint of its series and instances, so a StableStudy with the same fingerprint (a replay
    # of the watcher) numbers no event and one with another fingerprint is `study-changed`.
    # `subscription_event.event_code`: which event trigger of its topic an event is (NULL for a
    # resource trigger), so a notification says it.
    stamp = "TIMESTAMP WITH TIME ZONE"
    connection.execute(
        text(
            "CREATE TABLE subscription_study ("
            " study_uid VARCHAR(64) PRIMARY KEY,"
            " fingerprint VARCHAR(64) NOT NULL,"
            " changes INTEGER NOT NULL,"
            f" first_seen_at {stamp} NOT NULL,"
            f" updated_at {stamp} NOT NULL)"
        )
    )
    connection.execute(text("ALTER TABLE subscription_event ADD COLUMN event_code VARCHAR(32)"))


def _leases(connection: Connection) -> None:
    # Leases (docs/adr/0032-replica-leases.md): one row per piece of work that one replica at a time
    # may do (the change-feed watcher, each running analysis Task). `expires_at` is written from
    # the holder's clock; a row whose time is past may be taken over by another replica.
    stamp = "TIMESTAMP WITH TIME ZONE"
    connection.execute(
        text(
            "CREATE TABLE lease ("
            " name VARCHAR(200) PRIMARY KEY,"
            " holder VARCHAR(200) NOT NULL,"
            f" acquired_at {stamp} NOT NULL,"
            f" expires_at {stamp} NOT NULL)"
        )
    )
    connection.execute(text("CREATE INDEX ix_lease_expires ON lease (expires_at)"))


def _expiring_entries(connection: Connection) -> None:
    # Short-lived shared state of the built-in authorization server (ADR 0032): authorization codes,
    # the private_key_jwt jti replay cache and the lockout counters, so every replica sees them.
    # One table, keyed by (kind, key); rows past `expires_at` are dead and purged lazily.
    stamp = "TIMESTAMP WITH TIME ZONE"
    connection.execute(
        text(
            "CREATE TABLE expiring_entry ("
            " kind VARCHAR(32) NOT NULL,"
            " key VARCHAR(300) NOT NULL,"
            " value TEXT NOT NULL,"
            f" expires_at {stamp} NOT NULL,"
            " PRIMARY KEY (kind, key))"
        )
    )
    connection.execute(text("CREATE INDEX ix_expiring_entry_expires ON expiring_entry (expires_at)"))


def _import_ledger(connection: Connection) -> None:
    # What $import stored (ADR 0038): one row per SOP Instance UID, with the hash of the content it
    # came from and of the identity it was given, so importing the same archive again stores nothing
    # twice although coercion makes each stored copy differ (its Original Attributes Sequence is dated).
    stamp = "TIMESTAMP WITH TIME ZONE"
    connection.execute(
        text(
            "CREATE TABLE import_instance ("
            " sop_instance_uid VARCHAR(64) PRIMARY KEY,"
            " content_key VARCHAR(64) NOT NULL,"
            " study_instance_uid VARCHAR(64) NOT NULL,"
            " pacs_id VARCHAR(100) NOT NULL,"
            f" imported_at {stamp} NOT NULL)"
        )
    )


#: Every migration ever released, in order. Versions are consecutive from 1.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "resource versions, current pointer, token/date/reference/string index", _initial_schema),
    Migration(2, "feed_position: where change-feed watchers are (Orthanc /changes)", _feed_positions),
    Migration(3, "search index owner indexes include param (fast _sort)", _owner_indexes_with_param),
    Migration(4, "outbox: every stored version, for the upstream sync", _outbox),
    Migration(5, "outbox.correlation_id: the request that wrote the version", _outbox_correlation),
    Migration(6, "resource_version.author: the principal that wrote the version", _version_author),
    Migration(7, "subscription_state, subscription_event: topic-based Subscriptions", _subscription_events),
    Migration(8, "subscription channel, heartbeat, websocket binding tokens", _subscription_channels),
    Migration(
        9, "subscription_study, subscription_event.event_code: study available/changed", _study_changes
    ),
    Migration(10, "lease: time-limited ownership of work shared by replicas", _leases),
    Migration(11, "expiring_entry: the built-in authorization server's shared state", _expiring_entries),
    Migration(12, "import_instance: what $import stored, for idempotent imports", _import_ledger),
)


def _lock(connection: Connection) -> None:
    """Serialise schema changes across processes (PostgreSQL; SQLite's BEGIN IMMEDIATE already does)."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK_KEY})


def current_version(engine: Engine) -> int:
    """The highest applied migration (0 for an empty database). Creates `schema_version` when
    missing, under the same lock as the migrations: the existence check and the CREATE must be one
    step, or two replicas starting together both create it."""
    with engine.connect().execution_options(**{WRITE: True}) as connection:
        with connection.begin():
            _lock(connection)
            SchemaVersion.__table__.create(connection, checkfirst=True)  # type: ignore[attr-defined]
        version = connection.execute(select(func.max(SchemaVersion.version))).scalar_one_or_none()
    return int(version or 0)


def upgrade(engine: Engine, migrations: tuple[Migration, ...] = MIGRATIONS) -> int:
    """Apply pending migrations in order; return the resulting schema version. Idempotent."""
    current_version(engine)  # creates schema_version if missing
    version = 0
    for migration in migrations:
        with engine.connect().execution_options(**{WRITE: True}) as connection, connection.begin():
            _lock(connection)
            version = int(
                connection.execute(select(func.max(SchemaVersion.version))).scalar_one_or_none() or 0
            )
            if migration.version <= version:
                continue
            if migration.version != version + 1:
                raise RuntimeError(f"migration {migration.version} does not follow schema version {version}")
            migration.apply(connection)
            connection.execute(
                insert(SchemaVersion).values(
                    version=migration.version, description=migration.description, applied_at=datetime.now(UTC)
                )
            )
            version = migration.version
    return version
