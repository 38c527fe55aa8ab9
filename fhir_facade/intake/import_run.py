"""One import, start to end, in a worker thread (ADR 0038).

1. **Validate every instance.** Each entry of the upload is read (decompressed, hashed) and checked
   (`validation.check_instance`) by a small pool of reading threads, a few entries ahead of the
   one being decided; `dciodvfy` on the first instance of each series, or on all. The ledger says
   which instances an earlier import already stored with the same content and identity.
2. **A study is the unit.** A study with a refused instance is not stored at all: its other
   instances are refused too, naming the one that was. Nothing of it reaches the PACS.
3. **Store study by study**, each instance coerced to the caller's Patient and order (PS3.3
   C.12.1.1.9, `coercion.coerce_identity`) and posted to Orthanc by a bounded pool of threads. When
   the PACS fails or refuses one, what this import stored of that study is deleted again and every
   instance of the study is reported refused with the reason; other studies are not affected.

Memory is bounded: an entry takes one of `_slots(concurrency)` slots from being read until it is
stored or refused, so at most that many entries (each at most `IN_MEMORY_BYTES`; larger ones are
files) are in memory at once. The upload is a file under the job's directory, deleted when the job
ends.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydicom

from fhir_facade.intake.coercion import IdentityTarget, coerce_identity
from fhir_facade.intake.import_ledger import ImportLedger, LedgerEntry
from fhir_facade.intake.import_pacs import OrthancStore
from fhir_facade.intake.import_sources import Entry, Member, upload_entries
from fhir_facade.intake.validation import Verdict, check_instance, run_dciodvfy

__all__ = ["ImportOptions", "ImportReport", "InstanceResult", "run_import"]

log = logging.getLogger(__name__)

#: Valid instances looked up in the ledger together before they are sent.
_LEDGER_BATCH = 16
#: Threads that read and check entries ahead of the one being decided (zlib, sha256 and socket
#: writes release the GIL; pydicom's parse does not, so more than the cores buys nothing).
_READERS = 2
#: Entries read ahead of the one being decided.
_READ_AHEAD = 2 * _READERS


def _slots(concurrency: int) -> int:
    """Entries in memory at once: the read-ahead, a ledger batch, and two per store connection."""
    return _READ_AHEAD + _LEDGER_BATCH + 2 * concurrency


Status = Literal["stored", "stored-with-warnings", "already-stored", "refused", "skipped"]
DciodvfyPolicy = Literal["series", "all", "off"]


@dataclass
class InstanceResult:
    """The answer for one entry of the upload."""

    entry: str
    status: Status
    reasons: list[str] = field(default_factory=list)
    sop_instance_uid: str | None = None
    study_uid: str | None = None
    coerced: tuple[str, ...] = ()


@dataclass
class ImportReport:
    results: list[InstanceResult] = field(default_factory=list)

    def count(self, status: Status) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def studies(self) -> dict[str, str]:
        """Study Instance UID -> "stored" (something of it is in the PACS) or "refused"."""
        outcome: dict[str, str] = {}
        for result in self.results:
            if result.study_uid is None:
                continue
            stored = result.status in ("stored", "stored-with-warnings", "already-stored")
            if stored or result.study_uid not in outcome:
                outcome[result.study_uid] = "stored" if stored else "refused"
        return outcome


@dataclass(frozen=True)
class ImportOptions:
    target: IdentityTarget | None
    modifying_system: str
    source_of_previous_values: str
    dciodvfy: DciodvfyPolicy
    concurrency: int


@dataclass
class _Candidate:
    member: Member
    verdict: Verdict
    key: str
    result: InstanceResult
    #: The answer of the PACS, once sent: (status, PACS id, reason).
    future: Future[tuple[str, str, str]] | None = None


def _content_key(member: Member, target: IdentityTarget | None) -> str:
    return hashlib.sha256(f"{member.sha256}|{target!r}".encode()).hexdigest()


def _read(entry: Entry) -> tuple[Member, Verdict | None]:
    """Read and check one entry (in a reading thread)."""
    member = entry.load()
    if not member.readable:
        return member, None
    if member.data is not None:
        return member, check_instance(member.data)
    assert member.path is not None
    return member, check_instance(member.path)


def _read_ahead(
    entries: Iterator[Entry], readers: ThreadPoolExecutor, slots: threading.Semaphore
) -> Iterator[tuple[Member, Verdict | None]]:
    """The entries read and checked, in upload order, `_READ_AHEAD` at a time; each takes a slot."""
    window: deque[Future[tuple[Member, Verdict | None]]] = deque()
    for entry in entries:
        slots.acquire()
        window.append(readers.submit(_read, entry))
        if len(window) >= _READ_AHEAD:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()


def _dciodvfy(member: Member, verdict: Verdict, workdir: Path) -> None:
    if member.path is not None:
        run_dciodvfy(member.path, verdict)
        return
    with tempfile.NamedTemporaryFile(dir=workdir, suffix=".dcm") as copy:
        copy.write(member.content())
        copy.flush()
        run_dciodvfy(Path(copy.name), verdict)


def _validate(
    member: Member, verdict: Verdict, options: ImportOptions, checked_series: set[str], workdir: Path
) -> InstanceResult:
    series = verdict.series_uid or ""
    if (
        verdict.ok
        and options.dciodvfy != "off"
        and (options.dciodvfy == "all" or series not in checked_series)
    ):
        checked_series.add(series)
        _dciodvfy(member, verdict, workdir)
    return InstanceResult(
        member.name,
        "refused" if verdict.errors else "stored",
        [*verdict.errors, *verdict.warnings],
        verdict.sop_instance_uid,
        verdict.study_uid
        if verdict.study_uid and not any("StudyInstanceUID" in e for e in verdict.errors)
        else None,
    )


def _check_ledger(candidates: list[_Candidate], ledger: ImportLedger, store: OrthancStore) -> None:
    """Instances an earlier import stored: the same content and identity -> already stored; another
    content under the same UID -> refused (the PACS keeps one instance per UID)."""
    known = ledger.find(c.verdict.sop_instance_uid or "" for c in candidates)
    for candidate in candidates:
        entry = known.get(candidate.verdict.sop_instance_uid or "")
        if entry is None or not store.exists(entry.pacs_id):
            continue
        if entry.content_key == candidate.key:
            candidate.result.status = "already-stored"
            candidate.result.reasons.append("an earlier import stored this instance; nothing stored twice")
        else:
            candidate.result.status = "refused"
            candidate.result.reasons.insert(
                0, "an earlier import stored another content or identity under this SOP Instance UID"
            )


def _whole_studies(candidates: list[_Candidate]) -> None:
    """A study with a refused instance is stored not at all (nothing half-stored)."""
    refused: dict[str, str] = {}
    for candidate in candidates:
        if candidate.result.status == "refused" and candidate.verdict.study_uid:
            refused.setdefault(candidate.verdict.study_uid, candidate.member.name)
    for candidate in candidates:
        study = candidate.verdict.study_uid or ""
        if study in refused and candidate.result.status in ("stored", "stored-with-warnings"):
            candidate.result.status = "refused"
            candidate.result.reasons.insert(
                0, f"not stored: {refused[study]} of the same study was refused (a study is stored whole)"
            )


def _prepared(candidate: _Candidate, options: ImportOptions) -> bytes:
    """The bytes to store: the file as uploaded, or with its identity coerced."""
    content = candidate.member.content()
    if options.target is None:
        return content
    ds = pydicom.dcmread(io.BytesIO(content))
    changed = coerce_identity(
        ds,
        options.target,
        modifying_system=options.modifying_system,
        source_of_previous_values=options.source_of_previous_values,
    )
    candidate.result.coerced = changed
    if not changed:
        return content
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def _store_one(candidate: _Candidate, options: ImportOptions, store: OrthancStore) -> tuple[str, str, str]:
    try:
        content = _prepared(candidate, options)
    except Exception as error:  # a value pydicom parsed lazily and cannot write back
        return "Failed", "", f"could not be coerced: {type(error).__name__}: {error}"[:300]
    answer = store.store(content)
    return answer.status, answer.pacs_id, answer.reason


def _undo(store: OrthancStore, answers: list[tuple[str, str, str]]) -> str:
    """Delete what this import stored of a study; a note naming what could not be deleted."""
    kept = [a[1] for a in answers if a[0] == "Success" and not store.delete(a[1])]
    return f"; {len(kept)} instance(s) could not be deleted again: {', '.join(kept)}" if kept else ""


def _finish_study(
    study: str, members: list[_Candidate], store: OrthancStore, ledger: ImportLedger, refused: bool
) -> None:
    """Collect the answers of a study's instances: record them, or take the study back whole."""
    answers = [c.future.result() if c.future else ("Failed", "", "not sent") for c in members]
    if refused:  # an instance validated after these was refused: none of the study stays
        note = _undo(store, answers)
        if note:
            for candidate in members:
                candidate.result.reasons.append(note.lstrip("; "))
        return
    failed = [
        (c, a) for c, a in zip(members, answers, strict=True) if a[0] not in ("Success", "AlreadyStored")
    ]
    if failed:
        first, (_, _, reason) = failed[0]
        note = _undo(store, answers)
        for candidate, answer in zip(members, answers, strict=True):
            candidate.result.status = "refused"
            own = answer[2] if answer[0] not in ("Success", "AlreadyStored") else None
            candidate.result.reasons.insert(
                0,
                own
                or f"not stored: {first.member.name} of the same study failed ({reason}); "
                f"what this import stored of the study was deleted again{note}",
            )
        log.warning("Import: study %s not stored: %s", study, reason)
        return
    entries: list[LedgerEntry] = []
    for candidate, (status, pacs_id, _) in zip(members, answers, strict=True):
        result = candidate.result
        if status == "AlreadyStored" and not result.coerced:
            result.status = "already-stored"
            result.reasons.append("the PACS already held this very instance")
        elif result.coerced or candidate.verdict.warnings:
            result.status = "stored-with-warnings"
            if result.coerced:
                result.reasons.append(
                    f"coerced {', '.join(result.coerced)}; the previous values are in the Original "
                    "Attributes Sequence"
                )
        entries.append(LedgerEntry(result.sop_instance_uid or "", candidate.key, study, pacs_id))
    ledger.record(entries)


def run_import(
    kind: str,
    body: Path,
    workdir: Path,
    options: ImportOptions,
    store: OrthancStore,
    ledger: ImportLedger,
    progress: Callable[[str], None],
) -> ImportReport:
    """Validate every entry of the upload; send each valid instance as soon as it passed, unless its
    study already has a refusal; in the end keep the studies that passed whole and delete what was
    sent of the others."""
    report = ImportReport()
    candidates: list[_Candidate] = []
    checked_series: set[str] = set()
    seen: dict[str, _Candidate] = {}
    refused_studies: set[str] = set()
    slots = threading.Semaphore(_slots(options.concurrency))
    sent = done = 0

    def free(member: Member) -> None:
        """The entry is decided or stored: its bytes go, its slot is free for the next entry."""
        member.release()
        slots.release()

    def stored(candidate: _Candidate) -> Callable[[object], None]:
        def callback(_: object) -> None:
            nonlocal done
            free(candidate.member)
            done += 1
            if done % 20 == 0:
                progress(f"read {len(report.results)} entries, stored {done} instances")

        return callback

    pending: list[_Candidate] = []

    def send(batch: list[_Candidate]) -> int:
        """Look the batch up in the ledger (one query), then send what is new; the batch empties."""
        _check_ledger(batch, ledger, store)
        count = 0
        for candidate in batch:
            study = candidate.verdict.study_uid or ""
            if candidate.result.status == "refused":
                refused_studies.add(study)
            if candidate.result.status == "stored" and study not in refused_studies:
                candidate.future = pool.submit(_store_one, candidate, options, store)
                candidate.future.add_done_callback(stored(candidate))
                count += 1
            else:
                free(candidate.member)
        batch.clear()
        return count

    with (
        upload_entries(kind, body, workdir) as entries,
        ThreadPoolExecutor(_READERS, thread_name_prefix="import-read") as readers,
        ThreadPoolExecutor(options.concurrency, thread_name_prefix="import-store") as pool,
    ):
        for member, checked in _read_ahead(entries, readers, slots):
            if checked is None:
                report.results.append(InstanceResult(member.name, "skipped", [member.skipped or "skipped"]))
                free(member)
                continue
            verdict = checked
            result = _validate(member, verdict, options, checked_series, workdir)
            report.results.append(result)
            candidate = _Candidate(member, verdict, _content_key(member, options.target), result)
            candidates.append(candidate)
            study = verdict.study_uid or ""
            if not verdict.ok:
                free(member)
                refused_studies.add(study)
                continue
            uid = verdict.sop_instance_uid or ""
            twin = seen.get(uid)
            if twin is not None:
                same = twin.key == candidate.key
                result.status = "already-stored" if same else "refused"
                result.reasons.insert(
                    0,
                    f"{'the same instance as' if same else 'another content with the SOP Instance UID of'} "
                    f"{twin.member.name} in this upload",
                )
                free(member)
                if not same:
                    refused_studies.add(study)
                continue
            seen[uid] = candidate
            pending.append(candidate)
            if len(pending) >= _LEDGER_BATCH:
                sent += send(pending)
        sent += send(pending)
        progress(f"read {len(report.results)} entries, stored {done} of {sent} instances")
        _whole_studies(candidates)
        by_study: dict[str, list[_Candidate]] = {}
        for candidate in candidates:
            if candidate.future is not None:
                by_study.setdefault(candidate.verdict.study_uid or "", []).append(candidate)
        for study, members in by_study.items():
            _finish_study(study, members, store, ledger, refused=study in refused_studies)
    return report


def report_parameters(report: ImportReport) -> dict[str, Any]:
    """The answer of `$import`: a Parameters resource (operations/OperationDefinition-import.json)."""
    summary = [
        {"name": status, "valueInteger": report.count(status)}
        for status in ("stored", "stored-with-warnings", "already-stored", "refused", "skipped")
    ]
    parameters: list[dict[str, Any]] = [{"name": "summary", "part": summary}]
    for study, outcome in report.studies.items():
        parameters.append(
            {
                "name": "study",
                "part": [
                    {"name": "studyInstanceUid", "valueString": study},
                    {"name": "outcome", "valueCode": outcome},
                    *(
                        [{"name": "imagingStudy", "valueReference": {"reference": f"ImagingStudy/{study}"}}]
                        if outcome == "stored"
                        else []
                    ),
                ],
            }
        )
    for result in report.results:
        parts: list[dict[str, Any]] = [
            {"name": "entry", "valueString": result.entry},
            {"name": "status", "valueCode": result.status},
        ]
        if result.sop_instance_uid:
            parts.append({"name": "sopInstanceUid", "valueString": result.sop_instance_uid})
        if result.study_uid:
            parts.append({"name": "studyInstanceUid", "valueString": result.study_uid})
        parts.extend({"name": "reason", "valueString": reason} for reason in result.reasons if reason)
        parameters.append({"name": "instance", "part": parts})
    return {"resourceType": "Parameters", "parameter": parameters}
