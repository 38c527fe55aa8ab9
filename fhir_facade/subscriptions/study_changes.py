"""Which event a stable study is: `study-available` (first seen) or `study-changed` (new or removed
series or instances since), or none (the same study again: a replay).

Orthanc logs `StableStudy` each time a study has received no instance for `StableAge` seconds,
so a study that gets a new series after it was stable is logged stable again, and the watcher
publishes `StudyArrived` for every such change, at least once (fhir_facade/watcher/change_feed.py:
it saves its position after each change and retries a failed one). The watcher keeps no state of
studies, so this module does: one `subscription_study` row per study (migration 9) with a
fingerprint of what the live ImagingStudy held the last time (its series UIDs and their instance
counts). Classified in the transaction that numbers the events, so the row and the events commit
together.

A study that was in the PACS before this table existed and gets a new series afterwards is
reported `study-available` (the facade never saw it stable).
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update

from fhir_facade.subscriptions.tables import STUDY

__all__ = ["STUDY_AVAILABLE", "STUDY_CHANGED", "STUDY_DELETED", "classify", "fingerprint", "forget"]

#: The event codes of the study topic's two eventTriggers (CodeSystem subscription-event).
STUDY_AVAILABLE = "study-available"
STUDY_CHANGED = "study-changed"
#: A study deleted through the facade (`DELETE ImagingStudy/{id}`, ADR 0040).
STUDY_DELETED = "study-deleted"


def fingerprint(study: dict[str, Any]) -> str:
    """A digest of the study's series (UID, instance count), independent of their order."""
    series = sorted(
        f"{s.get('uid')}={s.get('numberOfInstances', len(s.get('instance', [])))}"
        for s in study.get("series", [])
    )
    text = f"{study.get('numberOfInstances')}|{'|'.join(series)}"
    return hashlib.sha256(text.encode()).hexdigest()


def classify(connection: Connection, study: dict[str, Any], at: datetime) -> str | None:
    """Record the stable `study` (a live ImagingStudy) and say which event it is: `study-available`
    the first time, `study-changed` when its fingerprint differs from the recorded one, None when
    it is the same (nothing happened to it since)."""
    key = STUDY.c.study_uid == str(study["id"])
    current = fingerprint(study)
    row = connection.execute(select(STUDY.c.fingerprint).where(key).with_for_update()).first()
    if row is None:
        connection.execute(
            insert(STUDY).values(
                study_uid=str(study["id"]), fingerprint=current, changes=0, first_seen_at=at, updated_at=at
            )
        )
        return STUDY_AVAILABLE
    if row.fingerprint == current:
        return None
    connection.execute(
        update(STUDY).where(key).values(fingerprint=current, changes=STUDY.c.changes + 1, updated_at=at)
    )
    return STUDY_CHANGED


def forget(connection: Connection, study_uid: str) -> None:
    """A deleted study is forgotten: if it is sent again, it is `study-available` again."""
    connection.execute(delete(STUDY).where(STUDY.c.study_uid == study_uid))
