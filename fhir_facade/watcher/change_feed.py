"""New studies in the PACS -> a callback, from Orthanc's change log (the issue "new studies become Tasks").

DICOMweb cannot notify, so the watcher polls Orthanc's `/changes` feed
(https://orthanc.uclouvain.be/book/users/rest.html#tracking-changes) and reacts to `StableStudy`,
which Orthanc logs once no instance of the study has arrived for `StableAge` seconds: the study is
complete enough to analyse, whereas `NewStudy` fires on its first instance.

Delivery is at least once. The feed position is saved after every handled change, so a crash
replays the change being handled (and, while a failed study awaits its retry, everything after
it): `on_study` must be idempotent, e.g. a conditional create of the Task keyed by Study UID.
The watcher knows nothing of FHIR or the store; the caller's `on_study` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fhir_facade.correlation import correlation_scope
from fhir_facade.dicomweb.client import DicomwebUnavailable
from fhir_facade.dicomweb.orthanc_rest import Change, OrthancRestClient

__all__ = [
    "FeedPositionStore",
    "FilePositionStore",
    "StudyArrivalWatcher",
    "StudyArrived",
    "TaskRule",
]

log = logging.getLogger(__name__)

STABLE_STUDY = "StableStudy"


class FeedPositionStore(Protocol):
    """Where the watcher keeps the `Seq` of the last change it is done with, across restarts.

    Synchronous on purpose: one tiny write per change; the SQL store implements it too, so that
    the position and the Tasks it led to can later commit in one transaction."""

    def load(self) -> int | None:
        """The saved position, None when nothing was ever saved."""
        ...

    def save(self, seq: int) -> None:
        """Durably remember `seq`; a crash after `save` returns must not lose it."""
        ...


class FilePositionStore:
    """A FeedPositionStore in one small text file, for the embedded set-up and tests.

    Written atomically (temporary file in the same folder, fsync, `os.replace`), so a crash
    leaves either the old or the new position, never a torn file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> int | None:
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        try:
            seq = int(text)
        except ValueError as exc:
            raise ValueError(f"feed position file {self.path} does not hold an integer: {text!r}") from exc
        if seq < 0:
            raise ValueError(f"feed position file {self.path} holds a negative position: {seq}")
        return seq

    def save(self, seq: int) -> None:
        if seq < 0:
            raise ValueError(f"seq must be >= 0, got {seq}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(f"{seq}\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@dataclass(frozen=True)
class StudyArrived:
    """The event "a study became stable in the PACS" (published on the event bus, ADR 0022): what a
    consumer needs to decide on and create a Task for a new study, from Orthanc's index.

    Empty DICOM values (type 2 attributes such as AccessionNumber) become None."""

    study_uid: str
    accession_number: str | None
    patient_id: str | None
    issuer_of_patient_id: str | None
    modalities: frozenset[str]
    orthanc_id: str


@dataclass(frozen=True)
class TaskRule:
    """Which arrived studies get an analysis Task: those with a series of one of `modalities`
    (the default model classifies brain MRI, so MR), except the `skip_studies` (Study UIDs; the
    demo study when FACADE_DEMO_ANALYZE=false)."""

    modalities: frozenset[str] = frozenset({"MR"})
    skip_studies: frozenset[str] = frozenset()

    def matches(self, study: StudyArrived) -> bool:
        return study.study_uid not in self.skip_studies and not self.modalities.isdisjoint(study.modalities)


@dataclass
class _Retry:
    change: Change
    failures: int


class StudyArrivalWatcher:
    """Polls Orthanc's change log and calls `on_study` once per stable study (at least once).

    Start position: with no saved position the watcher reads the feed from its beginning (seq 0),
    so studies that arrived while the facade was down or before it was first started are not
    missed; this relies on `on_study` being idempotent. Starting at `/changes?last` instead
    (`OrthancRestClient.latest_change_seq`) would be a configuration choice for a PACS with a
    large history.

    Failures of one study do not block the others: a change whose handling raises is remembered
    and retried at the start of each later poll, up to `max_attempts` attempts in all, then dropped
    with an error log. While it is pending, the saved position stays just before it, so a restart
    retries it too (and replays the later, already handled changes: idempotency again).
    `DicomwebUnavailable` is not a failure of the study: it ends the poll and propagates, and the
    change is attempted again on the next poll without counting an attempt.
    """

    def __init__(
        self,
        orthanc: OrthancRestClient,
        positions: FeedPositionStore,
        on_study: Callable[[StudyArrived], Awaitable[None]],
        *,
        poll_interval: float = 1.0,
        batch: int = 100,
        max_attempts: int = 5,
        max_backoff: float = 30.0,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if max_backoff < poll_interval:
            raise ValueError(f"max_backoff must be >= poll_interval, got {max_backoff} < {poll_interval}")
        self.orthanc = orthanc
        self.positions = positions
        self.on_study = on_study
        self.poll_interval = poll_interval
        self.batch = batch
        self.max_attempts = max_attempts
        self.max_backoff = max_backoff
        # The last Seq read from the feed; ahead of the saved position while retries are pending.
        self._cursor: int | None = None
        self._saved: int | None = None
        self._retries: dict[int, _Retry] = {}

    def forget_position(self) -> None:
        """Reload the position from the store at the next poll, and drop pending retries: another
        replica may have moved the feed on since this one last watched it (ADR 0032)."""
        self._cursor = None
        self._saved = None
        self._retries.clear()

    async def run_once(self) -> int:
        """Handle every change logged since the last poll (and the pending retries); return how
        many studies `on_study` accepted. Raises DicomwebUnavailable when Orthanc cannot be read."""
        return await self._poll(None)

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Poll until `stop` is set; returns within one change's handling after that.

        Never dies of one failure: an unreachable Orthanc (DicomwebUnavailable) backs off
        exponentially from `poll_interval` to `max_backoff`; any other error (a broken position
        store, a malformed feed) is logged with its traceback and retried the same way."""
        delay = self.poll_interval
        while not stop.is_set():
            try:
                with correlation_scope():  # one id per poll round, for its Orthanc requests
                    await self._poll(stop)
                delay = self.poll_interval
            except DicomwebUnavailable as exc:
                log.warning("Orthanc change feed unavailable, retrying in %.1f s: %s", delay, exc)
                delay = min(delay * 2, self.max_backoff)
            except Exception:
                log.exception("study-arrival poll failed, retrying in %.1f s", delay)
                delay = min(delay * 2, self.max_backoff)
            with contextlib.suppress(TimeoutError):  # the sleep between polls, cut short by `stop`
                await asyncio.wait_for(stop.wait(), timeout=delay)

    async def _poll(self, stop: asyncio.Event | None) -> int:
        if self._cursor is None:
            self._saved = self.positions.load()
            self._cursor = self._saved or 0
        handled = 0
        for seq in sorted(self._retries):
            if stop is not None and stop.is_set():
                return handled
            retry = self._retries[seq]
            if await self._handle(retry.change, retry.failures):
                handled += 1
            self._save()
        while stop is None or not stop.is_set():
            page = await self.orthanc.changes(self._cursor, self.batch)
            if not page.changes and page.last < self._cursor:
                # The feed is behind our position: Orthanc's database was replaced. Its seqs start
                # again at 1, so read it from the beginning (replays are harmless, see module doc).
                log.warning(
                    "Orthanc change log ends at %d, before our position %d: rereading it",
                    page.last,
                    self._cursor,
                )
                self._cursor = 0
                self._retries.clear()
                self._save()
                continue
            for change in page.changes:
                self._cursor = change.seq
                if change.change_type == STABLE_STUDY and await self._handle(change, 0):
                    handled += 1
                self._save()
                if stop is not None and stop.is_set():
                    return handled
            if page.done or not page.changes:
                break
        return handled

    async def _handle(self, change: Change, failures: int) -> bool:
        """Fetch and hand over one stable study; True when `on_study` accepted it. A failure is
        recorded for a later retry (or dropped after max_attempts); DicomwebUnavailable propagates."""
        try:
            study = await self._arrived_study(change.orthanc_id)
            if study is None:
                log.info(
                    "study %s (change %d) is no longer in Orthanc; skipped", change.orthanc_id, change.seq
                )
            else:
                await self.on_study(study)
        except DicomwebUnavailable:
            if change.seq not in self._retries:
                self._retries[change.seq] = _Retry(change, failures)
            raise
        except Exception:
            failures += 1
            if failures >= self.max_attempts:
                self._retries.pop(change.seq, None)
                log.exception(
                    "study %s (change %d) failed %d times; giving up on it",
                    change.orthanc_id,
                    change.seq,
                    failures,
                )
            else:
                self._retries[change.seq] = _Retry(change, failures)
                log.warning(
                    "study %s (change %d) failed (attempt %d of %d); retrying on a later poll",
                    change.orthanc_id,
                    change.seq,
                    failures,
                    self.max_attempts,
                    exc_info=True,
                )
            return False
        self._retries.pop(change.seq, None)
        return study is not None

    def _save(self) -> None:
        """Save the position below which everything is done: the cursor, or just before the
        oldest change still awaiting a retry. Unchanged positions are not rewritten."""
        assert self._cursor is not None
        position = min(self._retries) - 1 if self._retries else self._cursor
        if position != self._saved:
            self.positions.save(position)
            self._saved = position

    async def _arrived_study(self, orthanc_id: str) -> StudyArrived | None:
        """The study's identity, patient and modalities in three requests whatever its size:
        the study, its series (expanded) and the patient module of one of its instances."""
        study = await self.orthanc.study(orthanc_id)
        if study is None:
            return None
        series = await self.orthanc.study_series(orthanc_id)
        patient_module = await self.orthanc.study_patient_module(orthanc_id)
        if series is None or patient_module is None:
            return None
        tags: dict[str, Any] = study.get("MainDicomTags") or {}
        patient: dict[str, Any] = study.get("PatientMainDicomTags") or {}
        study_uid = _text(tags.get("StudyInstanceUID"))
        if study_uid is None:
            raise ValueError(f"Orthanc study {orthanc_id} has no StudyInstanceUID")
        modalities = {_text((s.get("MainDicomTags") or {}).get("Modality")) for s in series}
        return StudyArrived(
            study_uid=study_uid,
            accession_number=_text(tags.get("AccessionNumber")),
            patient_id=_text(patient.get("PatientID")),
            issuer_of_patient_id=_text(patient_module.get("IssuerOfPatientID")),
            modalities=frozenset(m for m in modalities if m is not None),
            orthanc_id=orthanc_id,
        )


def _text(value: object) -> str | None:
    """A DICOM string from Orthanc's JSON, None when absent or empty (type 2 attributes)."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value or None
