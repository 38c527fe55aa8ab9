"""Leases in the SQL store (table `lease`, migration 11): time-limited ownership of work that one
replica at a time may do, shared by every facade process on one database (docs/adr/0032).

A lease is a row (name, holder, expires_at). `acquire` takes it when it is free or expired, or
renews it when the caller already holds it, in one conditional UPDATE (or an INSERT that does
nothing on conflict): two replicas can never both succeed for the same live lease. The holder
renews well before `expires_at` (every third of the lease time); a replica that dies stops
renewing, and after at most one lease time another takes over. Times come from the replicas'
clocks, so they must be synchronised (NTP) to well under the lease time.

`claim_expired` hands out expired leases of one kind (a name prefix) to a caller; on PostgreSQL
with `FOR UPDATE SKIP LOCKED`, so replicas claiming at once take different rows without waiting
on each other; on SQLite the write transaction (BEGIN IMMEDIATE) serialises them.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Engine, text

from fhir_facade.store.transactions import write_connection

__all__ = ["Leases"]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Leases:
    """The leases one replica (`holder`) takes, renews and gives back, each lasting `seconds`."""

    def __init__(
        self, engine: Engine, holder: str, seconds: float, *, clock: Callable[[], datetime] = _utc_now
    ) -> None:
        if seconds <= 0:
            raise ValueError(f"seconds must be > 0, got {seconds}")
        if not holder:
            raise ValueError("holder must not be empty")
        self._engine = engine
        self.holder = holder
        self.seconds = seconds
        self._clock = clock

    def acquire(self, name: str) -> bool:
        """Take the lease `name` if it is free or expired, or renew it if this holder has it; True
        when this holder now has it for another `seconds`."""
        with write_connection(self._engine) as connection, connection.begin():
            return self._acquire(connection, name)

    def _acquire(self, connection: Connection, name: str) -> bool:
        now = self._clock()
        values = {
            "name": name,
            "holder": self.holder,
            "now": now,
            "until": now + timedelta(seconds=self.seconds),
        }
        taken = connection.execute(
            text(
                "UPDATE lease SET holder = :holder, expires_at = :until,"
                " acquired_at = CASE WHEN holder = :holder THEN acquired_at ELSE :now END"
                " WHERE name = :name AND (holder = :holder OR expires_at <= :now)"
            ),
            values,
        )
        if taken.rowcount == 1:
            return True
        inserted = connection.execute(
            text(
                "INSERT INTO lease (name, holder, acquired_at, expires_at)"
                " VALUES (:name, :holder, :now, :until) ON CONFLICT (name) DO NOTHING"
            ),
            values,
        )
        return inserted.rowcount == 1

    def release(self, name: str) -> None:
        """Give the lease back (only if this holder has it), so others need not wait for it to expire."""
        with write_connection(self._engine) as connection, connection.begin():
            connection.execute(
                text("DELETE FROM lease WHERE name = :name AND holder = :holder"),
                {"name": name, "holder": self.holder},
            )

    def holder_of(self, name: str) -> str | None:
        """Who holds the live lease `name` (None when it is free or expired)."""
        with self._engine.connect() as connection:
            holder = connection.execute(
                text("SELECT holder FROM lease WHERE name = :name AND expires_at > :now"),
                {"name": name, "now": self._clock()},
            ).scalar_one_or_none()
        return str(holder) if holder is not None else None

    def claim_expired(self, prefix: str, limit: int) -> list[str]:
        """Take up to `limit` expired leases whose name starts with `prefix` (work whose holder
        died); returns their names, now held by this holder."""
        now = self._clock()
        postgres = self._engine.dialect.name == "postgresql"
        lock = " FOR UPDATE SKIP LOCKED" if postgres else ""
        with write_connection(self._engine) as connection, connection.begin():
            names = [
                str(name)
                for name in connection.execute(
                    text(
                        "SELECT name FROM lease WHERE name LIKE :pattern AND expires_at <= :now"
                        f" ORDER BY expires_at LIMIT :limit{lock}"
                    ),
                    {"pattern": _like_prefix(prefix), "now": now, "limit": limit},
                ).scalars()
            ]
            return [name for name in names if self._acquire(connection, name)]


def _like_prefix(prefix: str) -> str:
    if any(c in prefix for c in "%_\\"):
        raise ValueError(f"lease prefix must not contain LIKE wildcards: {prefix!r}")
    return prefix + "%"
