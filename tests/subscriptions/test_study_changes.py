"""The study topic fires when a study becomes available and again when it changes: a real Orthanc
receives a study from dcmtk's storescu, then a new series into the same study; Orthanc logs
StableStudy twice, the facade's watcher publishes both, and the subscriptions get
`study-available` then `study-changed` (named on each notification-event), filtered by
`modality` and `identifier` (accession number, Study Instance UID). A StableStudy of an unchanged
study (a replay of the watcher) numbers no event: tested on the classification with a real SQLite
store."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine

from fhir_facade.embedded import DicomPeer, EmbeddedOrthanc, free_port
from fhir_facade.store import upgrade
from fhir_facade.subscriptions.notification import EVENT_SYSTEM, EVENT_TRIGGER_EXTENSION
from fhir_facade.subscriptions.study_changes import STUDY_AVAILABLE, STUDY_CHANGED, classify
from tests.conftest import ok_json, validate
from tests.dicom_factory import SeriesSpec, StudySpec, build_study
from tests.subscriptions.conftest import watching_facade
from tests.subscriptions.receiver import Receiver
from tests.subscriptions.test_rest_hook import FHIR_JSON, TOPICS, _events, subscription

STUDY_TOPIC = f"{TOPICS}/imaging-study-available"
STORE_AET = "STORESCU1"
STUDY_UID = "1.2.826.0.1.3680043.8.498.79.1"
ACCESSION = "ACC-CHG-1"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedOrthanc]:
    """This module's Orthanc also takes storescu from STORE_AET (the conftest's takes no peer)."""
    with EmbeddedOrthanc(
        tmp_path_factory.mktemp("orthanc-study-changes"),
        http_port=free_port(),
        dicom_port=free_port(),
        stable_age=1,
        http_auth=False,
        modalities=[DicomPeer(STORE_AET, "127.0.0.1")],
    ) as instance:
        yield instance


def _spec(series: SeriesSpec) -> StudySpec:
    return StudySpec(
        patient_id="CHG-1",
        patient_name="Wandel^Vera",
        study_uid=STUDY_UID,
        accession=ACCESSION,
        study_date="20241201",
        study_time="081500",
        description="follow-up",
        series=[series],
    )


def storescu(orthanc: EmbeddedOrthanc, spec: StudySpec, folder: Path) -> None:
    folder.mkdir()
    files = []
    for n, dataset in enumerate(build_study(spec)):
        path = folder / f"{n}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        files.append(str(path))
    done = subprocess.run(
        ["storescu", "-aet", STORE_AET, "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port), *files],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def _triggers(receiver: Receiver, path: str) -> list[tuple[int, str, dict[str, Any]]]:
    """(event number, trigger code, bundle) of each event received at `path`."""
    found = []
    for number, bundle in _events(receiver, path):
        parameters = bundle["entry"][0]["resource"]["parameter"]
        (event,) = [p for p in parameters if p["name"] == "notification-event"]
        (extension,) = event["extension"]
        assert extension["url"] == EVENT_TRIGGER_EXTENSION
        assert extension["valueCoding"]["system"] == EVENT_SYSTEM
        found.append((number, extension["valueCoding"]["code"], bundle))
    return sorted(found, key=lambda item: item[0])


def test_a_new_series_in_a_stable_study_is_a_study_changed_event(
    pacs: EmbeddedOrthanc, tmp_path: Path
) -> None:
    receiver = Receiver()
    receiver.start()
    try:
        with (
            watching_facade(pacs, receiver) as server,
            httpx.Client(base_url=f"{server.base_url}/", timeout=30, headers=FHIR_JSON) as http,
        ):
            subscriptions = {
                "all": subscription(STUDY_TOPIC, receiver.url("all"), "full-resource"),
                "ct": subscription(STUDY_TOPIC, receiver.url("ct"), "id-only", ("ImagingStudy?modality=CT",)),
                "accession": subscription(
                    STUDY_TOPIC,
                    receiver.url("accession"),
                    "id-only",
                    (f"ImagingStudy?identifier={ACCESSION}",),
                ),
                "uid": subscription(
                    STUDY_TOPIC,
                    receiver.url("uid"),
                    "empty",
                    (f"ImagingStudy?identifier=urn:dicom:uid|urn:oid:{STUDY_UID}",),
                ),
                "other": subscription(
                    STUDY_TOPIC, receiver.url("other"), "id-only", ("ImagingStudy?identifier=ACC-NOT-SENT",)
                ),
            }
            ids = {
                name: ok_json(http.post("Subscription", json=body), 201)["id"]
                for name, body in subscriptions.items()
            }
            deadline = time.monotonic() + 10
            while any(ok_json(http.get(f"Subscription/{i}"))["status"] != "active" for i in ids.values()):
                assert time.monotonic() < deadline, "never became active"
                time.sleep(0.05)

            storescu(
                pacs, _spec(SeriesSpec("MR", "AX T2", 1, body_part="HEAD", n_instances=2)), tmp_path / "mr"
            )
            receiver.wait_for(lambda: len(_events(receiver, "/all")) == 1, timeout=30)
            storescu(pacs, _spec(SeriesSpec("CT", "AX", 2, body_part="HEAD", n_instances=1)), tmp_path / "ct")
            receiver.wait_for(lambda: len(_events(receiver, "/all")) == 2, timeout=30)
            receiver.wait_for(lambda: len(_events(receiver, "/ct")) == 1, timeout=10)
            time.sleep(2.5)  # a third StableStudy, or an event for `other`, would have come by now

            ((first, available, before), (second, changed, after)) = _triggers(receiver, "/all")
            assert (first, available, second, changed) == (1, STUDY_AVAILABLE, 2, STUDY_CHANGED)
            assert [s["modality"]["code"] for s in before["entry"][1]["resource"]["series"]] == ["MR"]
            study = after["entry"][1]["resource"]
            assert (
                study["id"] == STUDY_UID and study["numberOfSeries"] == 2 and study["numberOfInstances"] == 3
            )
            # modality=CT: the study had no CT when it became available, so only the change.
            assert [(n, code) for n, code, _ in _triggers(receiver, "/ct")] == [(1, STUDY_CHANGED)]
            for name in ("accession", "uid"):
                assert [(n, code) for n, code, _ in _triggers(receiver, f"/{name}")] == [
                    (1, STUDY_AVAILABLE),
                    (2, STUDY_CHANGED),
                ], name
            assert receiver.bundles("/other") and _events(receiver, "/other") == []  # its handshake only

            replay = ok_json(http.get(f"Subscription/{ids['all']}/$events", params={"eventsSinceNumber": 1}))
            validate(replay)
            codes = [
                p["extension"][0]["valueCoding"]["code"]
                for p in replay["entry"][0]["resource"]["parameter"]
                if p["name"] == "notification-event"
            ]
            assert codes == [STUDY_AVAILABLE, STUDY_CHANGED]
    finally:
        receiver.stop()


def _study(*series: tuple[str, int]) -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy",
        "id": "1.2.3.4",
        "numberOfInstances": sum(n for _, n in series),
        "series": [{"uid": uid, "numberOfInstances": n} for uid, n in series],
    }


def test_a_study_is_available_once_then_changed_only_when_its_content_changes(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    upgrade(engine)
    at = datetime.now(UTC)
    seen = []
    for study in (
        _study(("1.1", 2)),
        _study(("1.1", 2)),  # the watcher's replay of the same StableStudy
        _study(("1.1", 2), ("1.2", 1)),  # a new series
        _study(("1.2", 1), ("1.1", 2)),  # the same, listed in another order
        _study(("1.1", 3), ("1.2", 1)),  # a new instance in a series
    ):
        with engine.begin() as connection:
            seen.append(classify(connection, study, at))
    assert seen == [STUDY_AVAILABLE, None, STUDY_CHANGED, None, STUDY_CHANGED]
