"""The study-arrival watcher against a real Orthanc (StableAge 1 s), each test with its own PACS
so that every feed starts empty and positions are predictable."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from fhir_facade.dicomweb import DicomwebUnavailable
from fhir_facade.dicomweb.orthanc_rest import OrthancRestClient
from fhir_facade.embedded import EmbeddedOrthanc, free_port
from fhir_facade.watcher import FilePositionStore, StudyArrivalWatcher, StudyArrived, TaskRule
from tests import dicom_factory
from tests.dicom_factory import SeriesSpec, StudySpec

DEADLINE_S = 30.0


def mr_study() -> StudySpec:
    return StudySpec(
        patient_id="W-MR-1",
        patient_name="Watcher^Mara",
        issuer_of_patient_id="HOSPITAL-A",
        accession="ACC-W-MR",
        series=[
            SeriesSpec("MR", "AX T1", 1, n_instances=2),
            SeriesSpec("MR", "AX T2", 2, n_instances=1),
        ],
    )


def ct_study() -> StudySpec:
    return StudySpec(
        patient_id="W-CT-2",
        patient_name="Watcher^Carl",
        accession="ACC-W-CT",
        series=[SeriesSpec("CT", "HEAD", 1, n_instances=2)],
    )


def mixed_study_without_accession() -> StudySpec:
    return StudySpec(
        patient_id="W-MX-3",
        patient_name="Watcher^Mia",
        accession="",
        series=[SeriesSpec("CT", "ABDOMEN", 1, n_instances=1), SeriesSpec("MR", "AX T1", 2, n_instances=1)],
    )


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[EmbeddedOrthanc]:
    with EmbeddedOrthanc(
        tmp_path / "orthanc",
        http_port=free_port(),
        dicom_port=free_port(),
        stable_age=1,
        http_auth=False,  # loopback only; the credentialed path: tests/embedded/test_pacs_access.py
    ) as instance:
        yield instance


@pytest.fixture
async def client(pacs: EmbeddedOrthanc) -> AsyncIterator[OrthancRestClient]:
    rest = OrthancRestClient(pacs.url, timeout=10, max_connections=4)
    await rest.open()
    yield rest
    await rest.close()


@pytest.fixture
def positions(tmp_path: Path) -> FilePositionStore:
    return FilePositionStore(tmp_path / "state" / "feed-position")


def upload(pacs: EmbeddedOrthanc, *specs: StudySpec) -> None:
    with httpx.Client(timeout=30) as http:
        for spec in specs:
            dicom_factory.upload(http, pacs.url, dicom_factory.build_study(spec))


class Recorder:
    """An on_study callback that records what it accepted; `fail_first` studies raise once."""

    def __init__(self, fail_first: set[str] | None = None, always_fail: bool = False) -> None:
        self.accepted: list[StudyArrived] = []
        self.attempts: list[str] = []
        self._fail_first = set(fail_first or ())
        self._always_fail = always_fail

    async def __call__(self, study: StudyArrived) -> None:
        self.attempts.append(study.study_uid)
        if self._always_fail or study.study_uid in self._fail_first:
            self._fail_first.discard(study.study_uid)
            raise RuntimeError(f"simulated failure for {study.study_uid}")
        self.accepted.append(study)

    def uids(self) -> list[str]:
        return [s.study_uid for s in self.accepted]


async def poll_until(watcher: StudyArrivalWatcher, done: Callable[[], bool]) -> int:
    """run_once until `done()`, within DEADLINE_S; returns the total run_once reported."""
    total = 0
    deadline = time.monotonic() + DEADLINE_S
    while not done():
        assert time.monotonic() < deadline, "the studies did not become stable in time"
        total += await watcher.run_once()
        if not done():
            await asyncio.sleep(0.2)
    return total


async def stable_study_seq(client: OrthancRestClient, study_uid: str) -> int:
    """The Seq of the StableStudy change of this study, read straight from the feed."""
    page = await client.changes(0, 10_000)
    for change in page.changes:
        if change.change_type == "StableStudy":
            study = await client.study(change.orthanc_id)
            if study is not None and study["MainDicomTags"]["StudyInstanceUID"] == study_uid:
                return change.seq
    raise AssertionError(f"no StableStudy change for {study_uid}")


async def wait_until_stable(client: OrthancRestClient, *study_uids: str) -> None:
    """Until the feed holds a StableStudy change for each of the studies."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        try:
            for study_uid in study_uids:
                await stable_study_seq(client, study_uid)
            return
        except AssertionError:
            assert time.monotonic() < deadline, "the studies did not become stable in time"
            await asyncio.sleep(0.2)


def watcher(
    client: OrthancRestClient,
    positions: FilePositionStore,
    on_study: Callable[[StudyArrived], Awaitable[None]],
    *,
    batch: int = 100,
    max_attempts: int = 5,
) -> StudyArrivalWatcher:
    return StudyArrivalWatcher(
        client, positions, on_study, poll_interval=0.1, batch=batch, max_attempts=max_attempts
    )


def saved(positions: FilePositionStore) -> int:
    position = positions.load()
    assert position is not None
    return position


async def test_stable_studies_arrive_once_and_survive_a_restart(
    pacs: EmbeddedOrthanc, client: OrthancRestClient, positions: FilePositionStore
) -> None:
    mr, ct = mr_study(), ct_study()
    upload(pacs, mr, ct)
    seen = Recorder()
    first = watcher(client, positions, seen, batch=3)  # several pages per poll

    reported = await poll_until(first, lambda: len(seen.accepted) >= 2)

    assert reported == 2
    assert sorted(seen.uids()) == sorted([mr.study_uid, ct.study_uid])
    by_uid = {s.study_uid: s for s in seen.accepted}
    assert by_uid[mr.study_uid].accession_number == "ACC-W-MR"
    assert by_uid[mr.study_uid].patient_id == "W-MR-1"
    assert by_uid[mr.study_uid].issuer_of_patient_id == "HOSPITAL-A"
    assert by_uid[mr.study_uid].modalities == frozenset({"MR"})
    assert by_uid[ct.study_uid].accession_number == "ACC-W-CT"
    assert by_uid[ct.study_uid].patient_id == "W-CT-2"
    assert by_uid[ct.study_uid].issuer_of_patient_id is None
    assert by_uid[ct.study_uid].modalities == frozenset({"CT"})
    for study in seen.accepted:
        assert (await client.study(study.orthanc_id)) is not None
    rule = TaskRule()
    assert rule.matches(by_uid[mr.study_uid])
    assert not rule.matches(by_uid[ct.study_uid])
    assert saved(positions) >= await stable_study_seq(client, mr.study_uid)
    assert saved(positions) >= await stable_study_seq(client, ct.study_uid)
    assert await client.latest_change_seq() >= saved(positions)

    # A restarted facade: same position file, new watcher, nothing new to report.
    after_restart = Recorder()
    second = watcher(client, positions, after_restart, batch=3)
    assert await second.run_once() == 0
    assert after_restart.attempts == []

    # A study arriving later is reported exactly once, with its empty accession as None.
    mixed = mixed_study_without_accession()
    upload(pacs, mixed)
    await poll_until(second, lambda: len(after_restart.accepted) >= 1)
    assert await second.run_once() == 0
    assert after_restart.uids() == [mixed.study_uid]
    (arrived,) = after_restart.accepted
    assert arrived.accession_number is None
    assert arrived.modalities == frozenset({"CT", "MR"})
    assert rule.matches(arrived)
    assert not TaskRule(frozenset({"US"})).matches(arrived)
    assert not TaskRule(skip_studies=frozenset({arrived.study_uid})).matches(arrived)  # the demo's opt-out
    assert seen.uids().count(mixed.study_uid) == 0
    assert saved(positions) >= await stable_study_seq(client, mixed.study_uid)


async def test_a_failing_study_is_retried_without_skipping_its_position(
    pacs: EmbeddedOrthanc, client: OrthancRestClient, positions: FilePositionStore
) -> None:
    mr, ct = mr_study(), ct_study()
    upload(pacs, mr, ct)
    # Both stable before the first poll: were the CT to become stable a poll later, that poll
    # would already retry (and accept) the MR, and the first round would not be one round.
    await wait_until_stable(client, mr.study_uid, ct.study_uid)
    flaky = Recorder(fail_first={mr.study_uid})
    first = watcher(client, positions, flaky)

    # The CT is handled although the MR before or after it failed: one bad study blocks nothing.
    await first.run_once()
    assert mr.study_uid in flaky.attempts
    assert flaky.uids() == [ct.study_uid]
    failed_seq = await stable_study_seq(client, mr.study_uid)
    assert saved(positions) < failed_seq

    # A crash now: a new watcher on the same position file replays the failed study.
    replay = Recorder()
    assert await watcher(client, positions, replay).run_once() >= 1
    assert mr.study_uid in replay.uids()

    # The original watcher retries it on its next poll: exactly one successful handling there.
    assert await first.run_once() == 1
    assert flaky.uids().count(mr.study_uid) == 1
    assert flaky.attempts.count(mr.study_uid) == 2
    assert saved(positions) >= await stable_study_seq(client, ct.study_uid)
    assert saved(positions) >= failed_seq
    assert await first.run_once() == 0


async def test_a_study_that_keeps_failing_is_given_up_after_max_attempts(
    pacs: EmbeddedOrthanc, client: OrthancRestClient, positions: FilePositionStore
) -> None:
    mr = mr_study()
    upload(pacs, mr)
    broken = Recorder(always_fail=True)
    stubborn = watcher(client, positions, broken, max_attempts=2)

    await poll_until(stubborn, lambda: len(broken.attempts) >= 1)
    failed_seq = await stable_study_seq(client, mr.study_uid)
    assert saved(positions) < failed_seq
    assert await stubborn.run_once() == 0
    assert broken.attempts == [mr.study_uid, mr.study_uid]
    assert saved(positions) >= failed_seq  # given up: the position moves past it
    assert await stubborn.run_once() == 0
    assert len(broken.attempts) == 2


async def test_a_replaced_orthanc_database_is_read_from_the_start(
    pacs: EmbeddedOrthanc, client: OrthancRestClient, positions: FilePositionStore
) -> None:
    assert await client.latest_change_seq() == 0  # an empty change log
    positions.save(1_000_000)  # left over from a PACS whose database has since been replaced
    mr = mr_study()
    upload(pacs, mr)
    seen = Recorder()
    await poll_until(watcher(client, positions, seen), lambda: len(seen.accepted) >= 1)
    assert seen.uids() == [mr.study_uid]
    assert saved(positions) >= await stable_study_seq(client, mr.study_uid)
    assert saved(positions) < 1_000_000


async def test_run_forever_handles_arrivals_and_stops_promptly(
    pacs: EmbeddedOrthanc, client: OrthancRestClient, positions: FilePositionStore
) -> None:
    seen = Recorder()
    stop = asyncio.Event()
    loop = asyncio.create_task(watcher(client, positions, seen).run_forever(stop))
    mr = mr_study()
    upload(pacs, mr)
    deadline = time.monotonic() + DEADLINE_S
    while not seen.accepted:
        assert time.monotonic() < deadline and not loop.done()
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(loop, timeout=2)
    assert seen.uids() == [mr.study_uid]


async def test_orthanc_down(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    nobody = OrthancRestClient(f"http://127.0.0.1:{free_port()}", timeout=2, max_connections=2)
    positions = FilePositionStore(tmp_path / "feed-position")
    seen = Recorder()
    down = StudyArrivalWatcher(nobody, positions, seen, poll_interval=0.05, max_backoff=0.2)
    try:
        with pytest.raises(DicomwebUnavailable):
            await down.run_once()

        stop = asyncio.Event()
        loop = asyncio.create_task(down.run_forever(stop))
        await asyncio.sleep(0.5)  # several failed polls with backoff; the loop must survive them
        assert not loop.done()
        stop.set()
        await asyncio.wait_for(loop, timeout=1)
    finally:
        await nobody.close()
    assert positions.load() is None
    assert seen.attempts == []
    assert "change feed unavailable" in caplog.text


def test_file_position_store(tmp_path: Path) -> None:
    store = FilePositionStore(tmp_path / "sub" / "position")
    assert store.load() is None
    store.save(0)
    assert store.load() == 0
    store.save(42)
    assert store.load() == 42
    assert [p.name for p in store.path.parent.iterdir()] == ["position"]  # no temporary files left
    with pytest.raises(ValueError, match="seq"):
        store.save(-1)
    store.path.write_text("not a number")
    with pytest.raises(ValueError, match="does not hold an integer"):
        store.load()


def test_watcher_validates_its_arguments(tmp_path: Path) -> None:
    rest = OrthancRestClient("http://127.0.0.1:1", timeout=1, max_connections=1)
    positions = FilePositionStore(tmp_path / "p")
    with pytest.raises(ValueError, match="batch"):
        StudyArrivalWatcher(rest, positions, Recorder(), batch=0)
    with pytest.raises(ValueError, match="poll_interval"):
        StudyArrivalWatcher(rest, positions, Recorder(), poll_interval=0)
    with pytest.raises(ValueError, match="max_attempts"):
        StudyArrivalWatcher(rest, positions, Recorder(), max_attempts=0)
