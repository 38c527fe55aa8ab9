"""Change-feed positions in the SQL store (table `feed_position`, migration 2), so that every
replica and every restart continues where the last one stopped."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Engine, text

from fhir_facade.store.engine import WRITE

__all__ = ["SqlFeedPositionStore"]


class SqlFeedPositionStore:
    """`FeedPositionStore` (fhir_facade.watcher) for one named feed."""

    def __init__(self, engine: Engine, name: str) -> None:
        self._engine = engine
        self._name = name

    def load(self) -> int | None:
        with self._engine.connect() as connection:
            value = connection.execute(
                text("SELECT position FROM feed_position WHERE name = :name"), {"name": self._name}
            ).scalar_one_or_none()
        return int(value) if value is not None else None

    def save(self, seq: int) -> None:
        values = {"name": self._name, "position": seq, "now": datetime.now(UTC)}
        with self._engine.connect().execution_options(**{WRITE: True}) as connection, connection.begin():
            updated = connection.execute(
                text("UPDATE feed_position SET position = :position, updated_at = :now WHERE name = :name"),
                values,
            )
            if updated.rowcount == 0:
                connection.execute(
                    text(
                        "INSERT INTO feed_position (name, position, updated_at)"
                        " VALUES (:name, :position, :now)"
                    ),
                    values,
                )
