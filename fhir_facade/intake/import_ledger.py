"""What `$import` stored (table `import_instance`, migration 12; ADR 0038).

A row per SOP Instance UID: the content key (sha256 of the file as uploaded and of the identity it
was coerced to), the study, and the PACS's id of the stored copy. A second import of the same file
for the same patient finds the row (and the copy still in the PACS) and stores nothing; the same
UID with another content or identity is a conflict, refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, bindparam, text

from fhir_facade.store.transactions import write_connection

__all__ = ["ImportLedger", "LedgerEntry"]


@dataclass(frozen=True)
class LedgerEntry:
    sop_instance_uid: str
    content_key: str
    study_instance_uid: str
    pacs_id: str


class ImportLedger:
    """Reads and writes `import_instance` (synchronous: the import runs in a worker thread)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def find(self, uids: Iterable[str]) -> dict[str, LedgerEntry]:
        wanted = sorted(set(uids))
        found: dict[str, LedgerEntry] = {}
        if not wanted:
            return found
        query = text(
            "SELECT sop_instance_uid, content_key, study_instance_uid, pacs_id FROM import_instance"
            " WHERE sop_instance_uid IN :uids"
        ).bindparams(bindparam("uids", expanding=True))
        with self._engine.connect() as connection:
            for start in range(0, len(wanted), 500):
                for row in connection.execute(query, {"uids": wanted[start : start + 500]}):
                    found[row[0]] = LedgerEntry(row[0], row[1], row[2], row[3])
        return found

    def record(self, entries: Iterable[LedgerEntry]) -> None:
        rows = [
            {
                "uid": e.sop_instance_uid,
                "key": e.content_key,
                "study": e.study_instance_uid,
                "pacs": e.pacs_id,
                "now": datetime.now(UTC),
            }
            for e in entries
        ]
        if not rows:
            return
        with write_connection(self._engine) as connection, connection.begin():
            connection.execute(
                text("DELETE FROM import_instance WHERE sop_instance_uid IN :uids").bindparams(
                    bindparam("uids", expanding=True)
                ),
                {"uids": [r["uid"] for r in rows]},
            )
            connection.execute(
                text(
                    "INSERT INTO import_instance"
                    " (sop_instance_uid, content_key, study_instance_uid, pacs_id, imported_at)"
                    " VALUES (:uid, :key, :study, :pacs, :now)"
                ),
                rows,
            )

    def forget(self, uids: Iterable[str]) -> None:
        wanted = sorted(set(uids))
        if not wanted:
            return
        with write_connection(self._engine) as connection, connection.begin():
            connection.execute(
                text("DELETE FROM import_instance WHERE sop_instance_uid IN :uids").bindparams(
                    bindparam("uids", expanding=True)
                ),
                {"uids": wanted},
            )
