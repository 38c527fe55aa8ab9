"""Correcting a held study in the PACS: each instance fetched, coerced, stored again, the old deleted.

Orthanc ids hash PatientID + StudyInstanceUID (+ SeriesInstanceUID + SOPInstanceUID for an
instance), so a copy corrected to another PatientID is a new Orthanc study beside the old one: every
corrected instance is stored *before* the old one is deleted, and nothing is lost to a failure or a
crash in between; a second run finds only what is left of the old study and finishes it.

When the PatientID stays the same (only the accession, name, birth date, sex or issuer change) the
corrected instance has the old one's Orthanc id and Orthanc keeps the first it was given
(`OverwriteInstances` false, its default): the old instance is then deleted first and the corrected
one stored right after, with the original spooled to disk between the two, so a crash in that
window leaves a file to re-send (ADR 0039 names the window).

DICOM side only (pydicom and Orthanc's REST API); the FHIR side is reconcile_stage.py.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom

from fhir_facade.dicomweb.errors import DicomwebError
from fhir_facade.dicomweb.orthanc_rest import OrthancRestClient
from fhir_facade.intake.coercion import IdentityTarget, coerce_identity

__all__ = ["Correction", "OrthancInstances", "StudyCorrector"]

log = logging.getLogger(__name__)

#: Rounds of "correct what is left": instances still arriving under the old identity while a
#: round runs are corrected by the next one.
_ROUNDS = 5


class OrthancInstances:
    """The instance-level Orthanc REST calls a correction needs, on the facade's Orthanc client
    (its pool and its error translation: 5xx and transport errors are DicomwebUnavailable)."""

    def __init__(self, orthanc: OrthancRestClient) -> None:
        self._orthanc = orthanc

    async def study_instances(self, study_id: str) -> list[str]:
        """Orthanc ids of the study's instances (`GET /studies/{id}/instances`); [] when the study
        is gone (404)."""
        response = await self._orthanc._send("GET", f"/studies/{study_id}/instances")
        if response.status_code == 404:
            return []
        if response.status_code >= 400:
            raise DicomwebError(f"Orthanc rejected /studies/{study_id}/instances with {response.status_code}")
        body = response.json()
        if not isinstance(body, list):
            raise DicomwebError(f"Orthanc /studies/{study_id}/instances did not return a list")
        return [str(item["ID"]) for item in body if isinstance(item, dict) and "ID" in item]

    async def file(self, instance_id: str) -> bytes | None:
        """The stored DICOM file (`GET /instances/{id}/file`); None when it is gone."""
        response = await self._orthanc._send("GET", f"/instances/{instance_id}/file")
        if response.status_code == 404:
            return None
        if response.status_code >= 400:
            raise DicomwebError(f"Orthanc rejected /instances/{instance_id}/file with {response.status_code}")
        return response.content

    async def store(self, data: bytes) -> tuple[str, str]:
        """(Orthanc id, Status) of a stored file (`POST /instances`): Status is "Success" or
        "AlreadyStored" (an instance with that id was kept, this one was not)."""
        response = await self._orthanc._send(
            "POST", "/instances", content=data, headers={"Content-Type": "application/dicom"}
        )
        if response.status_code >= 400:
            raise DicomwebError(f"Orthanc refused to store a corrected instance ({response.status_code})")
        body: Any = response.json()
        if not isinstance(body, dict) or "ID" not in body:
            raise DicomwebError("Orthanc answered POST /instances without an ID")
        return str(body["ID"]), str(body.get("Status", ""))

    async def reconstruct(self, study_id: str) -> None:
        """Re-read the main DICOM tags of the study and its patient from the stored files
        (`POST /studies/{id}/reconstruct`, `/patients/{id}/reconstruct`). Orthanc takes a study's
        and a patient's index tags from the first instance it receives and keeps them: after an
        in-place correction they would still say the old accession or name (checked, Orthanc
        1.10), and so would QIDO and the change feed's StableStudy."""
        study = await self._orthanc.study(study_id)
        if study is None:
            return
        for path in (f"/studies/{study_id}", f"/patients/{study.get('ParentPatient')}"):
            response = await self._orthanc._send("POST", f"{path}/reconstruct", content=b"")
            if response.status_code >= 400 and response.status_code != 404:
                raise DicomwebError(f"Orthanc refused {path}/reconstruct ({response.status_code})")

    async def delete(self, instance_id: str) -> None:
        """`DELETE /instances/{id}`; an instance already gone is fine (a second run)."""
        response = await self._orthanc._send("DELETE", f"/instances/{instance_id}")
        if response.status_code >= 400 and response.status_code != 404:
            raise DicomwebError(f"Orthanc refused to delete instance {instance_id} ({response.status_code})")


@dataclass(frozen=True)
class Correction:
    """What a correction did: instances corrected (stored anew, old deleted), already right."""

    corrected: int
    unchanged: int
    changed_keywords: tuple[str, ...]


class StudyCorrector:
    """Corrects the instances of one Orthanc study to a target identity (reason CORRECT)."""

    def __init__(self, pacs: OrthancInstances, *, modifying_system: str, spool: Path) -> None:
        self._pacs = pacs
        self._modifying_system = modifying_system
        self._spool = spool

    async def correct(self, study_id: str, target: IdentityTarget, *, source: str) -> Correction:
        """Correct every instance of Orthanc study `study_id` (the study as it arrived). `source`
        goes into Source of Previous Values (0400,0564). Idempotent: run again after a failure
        or crash, it corrects what is left."""
        when = datetime.now(UTC)
        corrected = unchanged = in_place = 0
        keywords: set[str] = set()
        for _ in range(_ROUNDS):
            instance_ids = await self._pacs.study_instances(study_id)
            moved: list[str] = []
            unchanged = 0
            for instance_id in instance_ids:
                data = await self._pacs.file(instance_id)
                if data is None:
                    continue  # deleted meanwhile
                fixed, changed = self._coerced(data, target, source, when)
                if not changed:
                    unchanged += 1  # already says what it should (a second run, in place)
                    continue
                keywords.update(changed)
                new_id, _ = await self._pacs.store(fixed)
                if new_id == instance_id:  # same PatientID: Orthanc kept the old one
                    await self._replace_in_place(instance_id, data, fixed)
                    in_place += 1
                else:  # stored anew, or already by an earlier run that did not get to the delete
                    moved.append(instance_id)
                corrected += 1
            for instance_id in moved:  # only once every corrected copy of the round is stored
                await self._pacs.delete(instance_id)
            if unchanged == len(instance_ids):
                break  # nothing (left) to correct: the old study is gone, or all of it is right
        if in_place:
            await self._pacs.reconstruct(study_id)
        return Correction(corrected, unchanged, tuple(sorted(keywords)))

    def _coerced(
        self, data: bytes, target: IdentityTarget, source: str, when: datetime
    ) -> tuple[bytes, tuple[str, ...]]:
        ds = pydicom.dcmread(io.BytesIO(data))
        changed = coerce_identity(
            ds,
            target,
            modifying_system=self._modifying_system,
            source_of_previous_values=source,
            reason="CORRECT",
            when=when,
        )
        if not changed:
            return data, ()
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        return out.getvalue(), changed

    async def _replace_in_place(self, instance_id: str, original: bytes, fixed: bytes) -> None:
        """Same Orthanc id: delete, then store, with the original spooled to disk in between."""
        self._spool.mkdir(parents=True, exist_ok=True)
        spooled = self._spool / f"{instance_id}.dcm"
        spooled.write_bytes(original)
        await self._pacs.delete(instance_id)
        try:
            await self._pacs.store(fixed)
        except Exception:
            log.exception("Storing corrected instance %s failed; restoring the original", instance_id)
            await self._pacs.store(original)
            spooled.unlink(missing_ok=True)
            raise
        spooled.unlink(missing_ok=True)
