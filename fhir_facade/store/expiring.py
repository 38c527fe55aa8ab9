"""Short-lived shared state in the SQL store (table `expiring_entry`, migration 12): small values
keyed by (kind, key) that every replica on the database sees, each dead after its `expires_at`.

The built-in authorization server keeps here what must hold across replicas (docs/adr/0032):
authorization codes (issued by one replica, redeemed at another, once), the private_key_jwt `jti`
values already seen (a replay at another replica is refused) and the brute-force counters of
ADR 0011 (failures count wherever they land). Dead rows are ignored by every read and deleted
now and then by writes, so the table stays as small as the live state.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, text

from fhir_facade.store.transactions import write_connection

__all__ = ["EntryTransaction", "ExpiringEntries"]

#: First key of the two-key advisory lock of `ExpiringEntries.transaction` ("expi" in ASCII).
_LOCK_SPACE = 0x65787069
#: One write in this many also deletes the dead rows.
_PURGE_EVERY = 50


def _utc_now() -> datetime:
    return datetime.now(UTC)


class ExpiringEntries:
    """Single-use, insert-once and read-modify-write access to `expiring_entry`."""

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = _utc_now) -> None:
        self._engine = engine
        self._clock = clock

    def put(self, kind: str, key: str, value: str, expires_at: datetime) -> None:
        """Store `value` (replacing any earlier one, live or dead)."""
        with write_connection(self._engine) as connection, connection.begin():
            self._maybe_purge(connection)
            connection.execute(
                text("DELETE FROM expiring_entry WHERE kind = :kind AND key = :key"),
                {"kind": kind, "key": key},
            )
            connection.execute(
                text(
                    "INSERT INTO expiring_entry (kind, key, value, expires_at)"
                    " VALUES (:kind, :key, :value, :expires_at)"
                ),
                {"kind": kind, "key": key, "value": value, "expires_at": expires_at},
            )

    def take(self, kind: str, key: str) -> str | None:
        """Remove the entry and return its value if it was live: of any number of replicas taking
        one key at once, exactly one gets it (the DELETE is the claim)."""
        with write_connection(self._engine) as connection, connection.begin():
            row = connection.execute(
                text(
                    "DELETE FROM expiring_entry WHERE kind = :kind AND key = :key RETURNING value, expires_at"
                ),
                {"kind": kind, "key": key},
            ).one_or_none()
        if row is None or _as_datetime(row.expires_at) <= self._clock():
            return None
        return str(row.value)

    def add_if_absent(self, kind: str, key: str, value: str, expires_at: datetime) -> bool:
        """Store the entry unless a live one has the key; True when this call stored it."""
        with write_connection(self._engine) as connection, connection.begin():
            self._maybe_purge(connection)
            connection.execute(
                text("DELETE FROM expiring_entry WHERE kind = :kind AND key = :key AND expires_at <= :now"),
                {"kind": kind, "key": key, "now": self._clock()},
            )
            inserted = connection.execute(
                text(
                    "INSERT INTO expiring_entry (kind, key, value, expires_at)"
                    " VALUES (:kind, :key, :value, :expires_at) ON CONFLICT (kind, key) DO NOTHING"
                ),
                {"kind": kind, "key": key, "value": value, "expires_at": expires_at},
            )
            return inserted.rowcount == 1

    def count(self, kind: str) -> int:
        """How many live entries of `kind` there are (for tests and metrics)."""
        with self._engine.connect() as connection:
            return int(
                connection.execute(
                    text("SELECT COUNT(*) FROM expiring_entry WHERE kind = :kind AND expires_at > :now"),
                    {"kind": kind, "now": self._clock()},
                ).scalar_one()
            )

    @contextmanager
    def transaction(self) -> Iterator[EntryTransaction]:
        """One write transaction for reading and changing several entries as one step (the lockout
        counters: check, then count). Each key read is locked until the end (PostgreSQL: an
        advisory lock per key, which also covers keys with no row yet; SQLite: BEGIN IMMEDIATE)."""
        with write_connection(self._engine) as connection, connection.begin():
            self._maybe_purge(connection)
            yield EntryTransaction(connection, self._clock())

    def _maybe_purge(self, connection: Connection) -> None:
        if random.randrange(_PURGE_EVERY) == 0:  # load spreading, not security
            connection.execute(
                text("DELETE FROM expiring_entry WHERE expires_at <= :now"), {"now": self._clock()}
            )


class EntryTransaction:
    """The entries as one open transaction sees them (`ExpiringEntries.transaction`)."""

    def __init__(self, connection: Connection, now: datetime) -> None:
        self._connection = connection
        self.now = now

    def get(self, kind: str, key: str) -> str | None:
        """The live value, locking the key for the rest of the transaction."""
        if self._connection.dialect.name == "postgresql":
            digest = hashlib.blake2b(f"{kind}\0{key}".encode(), digest_size=4).digest()
            self._connection.execute(
                text("SELECT pg_advisory_xact_lock(:space, :key)"),
                {"space": _LOCK_SPACE, "key": int.from_bytes(digest, "big", signed=True)},
            )
        row = self._connection.execute(
            text("SELECT value, expires_at FROM expiring_entry WHERE kind = :kind AND key = :key"),
            {"kind": kind, "key": key},
        ).one_or_none()
        if row is None or _as_datetime(row.expires_at) <= self.now:
            return None
        return str(row.value)

    def put(self, kind: str, key: str, value: str, expires_at: datetime) -> None:
        self.delete(kind, key)
        self._connection.execute(
            text(
                "INSERT INTO expiring_entry (kind, key, value, expires_at)"
                " VALUES (:kind, :key, :value, :expires_at)"
            ),
            {"kind": kind, "key": key, "value": value, "expires_at": expires_at},
        )

    def delete(self, kind: str, key: str) -> None:
        self._connection.execute(
            text("DELETE FROM expiring_entry WHERE kind = :kind AND key = :key"), {"kind": kind, "key": key}
        )


def _as_datetime(value: object) -> datetime:
    """A timestamp as read back: PostgreSQL returns datetimes, SQLite the ISO text it was given."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
