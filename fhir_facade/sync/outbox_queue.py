"""The outbox as a work queue: lease due rows, then mark them sent, retried or dead.

Leases are taken in short transactions and the rows are sent outside them, so a slow upstream
never holds a lock that FHIR writes wait for. Lease transactions are serialised (PostgreSQL: one
transaction-scoped advisory lock; SQLite: its single writer), and a resource with a row under an
active lease is skipped, so two workers never send versions of one resource at the same time and
a resource's versions reach the upstream in order (ADR 0007).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Row, Table, and_, exists, func, insert, select, text, update
from sqlalchemy.orm import aliased

from fhir_facade.correlation import current_correlation_id
from fhir_facade.fhir.pipeline import EventBus, VersionStored
from fhir_facade.fhir.registry import registry
from fhir_facade.store.engine import WRITE
from fhir_facade.store.schema import OutboxEntry

__all__ = ["OutboxQueue", "OutboxRow", "QueueStatus"]

_outbox: Table = OutboxEntry.__table__  # type: ignore[attr-defined]
#: pg_advisory_xact_lock key of lease transactions: "sync" in ASCII.
_LEASE_LOCK_KEY = 0x73796E63


@dataclass(frozen=True)
class OutboxRow:
    seq: int
    resource_type: str
    resource_id: str
    version_id: int
    deleted: bool
    created_at: datetime
    attempts: int
    #: X-Correlation-ID of the request that wrote the version (None: no request, or older row).
    correlation_id: str | None = None


def _row(r: Row[Any]) -> OutboxRow:
    return OutboxRow(
        r.seq,
        r.resource_type,
        r.resource_id,
        r.version_id,
        r.deleted,
        r.created_at,
        r.attempts,
        r.correlation_id,
    )


@dataclass(frozen=True)
class QueueStatus:
    pending: int
    dead: int
    sent: int
    oldest_pending: datetime | None

    def lag_seconds(self, now: datetime | None = None) -> float:
        """Age of the oldest pending row: how far the upstream is behind (0 when caught up)."""
        if self.oldest_pending is None:
            return 0.0
        return ((now or datetime.now(UTC)) - self.oldest_pending).total_seconds()


class OutboxQueue:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def lease(self, limit: int, lease_seconds: float, now: datetime | None = None) -> list[OutboxRow]:
        """Due pending rows (oldest first) of resources no other worker holds, leased to us."""
        now = now or datetime.now(UTC)
        other = aliased(_outbox)
        held = exists().where(
            other.c.resource_type == _outbox.c.resource_type,
            other.c.resource_id == _outbox.c.resource_id,
            other.c.state == "pending",
            other.c.lease_until > now,
        )
        query = (
            select(_outbox)
            .where(
                _outbox.c.state == "pending",
                _outbox.c.next_attempt_at <= now,
                ~held,
            )
            .order_by(_outbox.c.seq)
            .limit(limit)
        )
        with self._engine.connect().execution_options(**{WRITE: True}) as connection, connection.begin():
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LEASE_LOCK_KEY})
            rows = connection.execute(query).all()
            if not rows:
                return []
            # Every pending row of the chosen resources goes with them: one worker owns a resource.
            keys = {(r.resource_type, r.resource_id) for r in rows}
            more = connection.execute(
                select(_outbox).where(
                    _outbox.c.state == "pending",
                    _outbox.c.seq.not_in([r.seq for r in rows]),
                    _outbox.c.resource_id.in_({key[1] for key in keys}),
                )
            ).all()
            chosen = [*rows, *(r for r in more if (r.resource_type, r.resource_id) in keys)]
            until = now + timedelta(seconds=lease_seconds)
            connection.execute(
                update(_outbox).where(_outbox.c.seq.in_([r.seq for r in chosen])).values(lease_until=until)
            )
        return sorted((_row(r) for r in chosen), key=lambda row: row.seq)

    def subscribe_to(self, bus: EventBus) -> None:
        """Write an outbox row for every version the store writes, in the version's own transaction."""
        bus.on_precommit(VersionStored, self.record)

    @staticmethod
    def record(connection: Connection, version: VersionStored) -> None:
        """The one writer of outbox rows: the row commits or rolls back with what it announces (ADR 0007).
        Version 0 asks for a live snapshot of a virtual resource, read when sent. Types the registry
        marks `synced: false` (Subscription, ADR 0026) get no row: they never leave this server."""
        facts = registry().facts(version.resource_type)
        if facts is not None and not facts.synced:
            return
        connection.execute(
            insert(_outbox).values(
                resource_type=version.resource_type,
                resource_id=version.resource_id,
                version_id=version.version,
                deleted=version.deleted,
                created_at=version.at,
                state="pending",
                attempts=0,
                next_attempt_at=version.at,
                correlation_id=current_correlation_id(),
            )
        )

    def enqueue_snapshot(self, resource_type: str, resource_id: str, now: datetime | None = None) -> None:
        """Ask for a live snapshot of a virtual resource to be sent (version 0: read when sent),
        e.g. every stable study when the upstream mirrors the PACS."""
        now = now or datetime.now(UTC)
        snapshot = VersionStored(resource_type, resource_id, 0, False, {}, now)
        with self._engine.connect().execution_options(**{WRITE: True}) as connection, connection.begin():
            self.record(connection, snapshot)

    def enqueue_deletion(self, resource_type: str, resource_id: str, now: datetime | None = None) -> None:
        """Ask for a virtual resource to be deleted upstream (a study deleted in the PACS, ADR 0040)."""
        now = now or datetime.now(UTC)
        deletion = VersionStored(resource_type, resource_id, 0, True, {}, now)
        with self._engine.connect().execution_options(**{WRITE: True}) as connection, connection.begin():
            self.record(connection, deletion)

    def mark_sent(self, seqs: Sequence[int], now: datetime | None = None) -> None:
        self._set(seqs, state="sent", sent_at=now or datetime.now(UTC), lease_until=None, last_error=None)

    def retry_later(self, seqs: Sequence[int], attempts: int, at: datetime, error: str) -> None:
        self._set(seqs, attempts=attempts, next_attempt_at=at, lease_until=None, last_error=error[:20000])

    def mark_dead(self, seqs: Sequence[int], attempts: int, error: str) -> None:
        self._set(seqs, state="dead", attempts=attempts, lease_until=None, last_error=error[:20000])

    def replay_dead(self, now: datetime | None = None) -> int:
        """Dead letters back to pending (after the cause was fixed upstream); returns how many."""
        with self._engine.connect().execution_options(**{WRITE: True}) as connection, connection.begin():
            result = connection.execute(
                update(_outbox)
                .where(_outbox.c.state == "dead")
                .values(state="pending", attempts=0, next_attempt_at=now or datetime.now(UTC))
            )
        return int(result.rowcount or 0)

    def dead_letters(self, limit: int = 100) -> list[tuple[OutboxRow, str | None]]:
        with self._engine.connect() as connection:
            rows = connection.execute(
                select(_outbox).where(_outbox.c.state == "dead").order_by(_outbox.c.seq).limit(limit)
            ).all()
        return [(_row(r), r.last_error) for r in rows]

    def status(self) -> QueueStatus:
        with self._engine.connect() as connection:
            counts: dict[str, int] = dict(
                connection.execute(select(_outbox.c.state, func.count()).group_by(_outbox.c.state)).all()
            )
            oldest = connection.execute(
                select(func.min(_outbox.c.created_at)).where(_outbox.c.state == "pending")
            ).scalar_one_or_none()
        if isinstance(oldest, str):  # SQLite aggregates lose the column type
            oldest = datetime.fromisoformat(oldest)
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=UTC)
        return QueueStatus(
            pending=int(counts.get("pending", 0)),
            dead=int(counts.get("dead", 0)),
            sent=int(counts.get("sent", 0)),
            oldest_pending=oldest,
        )

    def _set(self, seqs: Sequence[int], **values: object) -> None:
        if not seqs:
            return
        with self._engine.connect().execution_options(**{WRITE: True}) as connection, connection.begin():
            connection.execute(update(_outbox).where(and_(_outbox.c.seq.in_(list(seqs)))).values(**values))
