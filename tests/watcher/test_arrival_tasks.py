"""Study arrival -> Task, end to end: a real Orthanc's change feed, the facade's watcher in its
lifespan, the SQL store. An order's accession links the Task; CT gets no Task (default rule); a
restart neither misses nor repeats anything (position in the store, Task identifier = Study UID)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhir_facade.embedded import EmbeddedOrthanc, free_port
from tests.conftest import LiveServer, ok_json, serve
from tests.dicom_factory import SeriesSpec, StudySpec, build_study, upload
from tests.facade_process import wait_for
from tests.narrative_checks import narrative_text

FHIR_JSON = {"Content-Type": "application/fhir+json"}
MR_UID = "1.2.826.0.1.3680043.8.498.77.1"
CT_UID = "1.2.826.0.1.3680043.8.498.77.2"
LATE_UID = "1.2.826.0.1.3680043.8.498.77.3"


def study(uid: str, accession: str, modality: str) -> StudySpec:
    return StudySpec(
        patient_id="W-100",
        patient_name="Watch^Wendy",
        study_uid=uid,
        accession=accession,
        study_date="20241101",
        study_time="101000",
        description=f"{modality} arrival",
        series=[SeriesSpec(modality, "AX", 1, body_part="HEAD", n_instances=1)],
    )


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedOrthanc]:
    with EmbeddedOrthanc(
        tmp_path_factory.mktemp("orthanc-arrivals"),
        http_port=free_port(),
        dicom_port=free_port(),
        stable_age=1,
        http_auth=False,  # loopback only; the credentialed path: tests/embedded/test_pacs_access.py
    ) as instance:
        yield instance


def watching_facade(orthanc: EmbeddedOrthanc, database: Path) -> LiveServer:
    return serve(
        {
            "dicomweb_url": orthanc.dicomweb_url,
            "orthanc_url": orthanc.url,
            "watch_studies": True,
            "watch_poll_interval": 0.3,
            "database_url": f"sqlite:///{database}",
        }
    )


def tasks_for(fhir: httpx.Client, uid: str) -> list[dict[str, Any]]:
    bundle = ok_json(fhir.get("/Task", params={"identifier": f"urn:dicom:uid|urn:oid:{uid}"}))
    return [e["resource"] for e in bundle.get("entry", [])]


def test_new_mr_study_becomes_a_task_once(orthanc: EmbeddedOrthanc, tmp_path: Path) -> None:
    database = tmp_path / "store.sqlite3"
    with (
        watching_facade(orthanc, database) as server,
        httpx.Client(base_url=server.base_url, timeout=30) as fhir,
    ):
        order = ok_json(
            fhir.post(
                "/ServiceRequest",
                headers=FHIR_JSON,
                json={
                    "resourceType": "ServiceRequest",
                    "status": "active",
                    "intent": "order",
                    "priority": "stat",
                    "identifier": [{"system": "urn:oid:1.2.3.77", "value": "ACC-W-1"}],
                    "code": {"text": "MR head"},
                    "subject": {"reference": "Patient/W-100"},
                },
            ),
            201,
        )
        with httpx.Client(timeout=30) as client:
            upload(client, orthanc.url, build_study(study(MR_UID, "ACC-W-1", "MR")))
            upload(client, orthanc.url, build_study(study(CT_UID, "ACC-W-2", "CT")))

        (task,) = wait_for(lambda: tasks_for(fhir, MR_UID))
        assert task["status"] == "requested" and task["intent"] == "order"
        assert task["code"]["coding"][0]["code"] == "analyze"
        assert task["focus"]["reference"] == f"ImagingStudy/{MR_UID}"
        assert task["for"]["reference"] == "Patient/W-100"
        assert task["basedOn"] == [{"reference": f"ServiceRequest/{order['id']}"}]
        assert task["priority"] == "stat"
        narrative_text(
            task,
            f"Analyze imaging study ImagingStudy/{MR_UID} of patient Patient/W-100",
            f"for order ServiceRequest/{order['id']}",
            "Requested: waiting for the analysis worker",
            "Priority stat",
        )
        focus = ok_json(fhir.get(f"/{task['focus']['reference']}"))  # the focus resolves, live
        assert focus["basedOn"] == [{"reference": f"ServiceRequest/{order['id']}"}]  # order, live
        found = ok_json(fhir.get("/ImagingStudy", params={"identifier": "ACC-W-1"}))
        assert found["entry"][0]["resource"]["basedOn"] == focus["basedOn"]
        time.sleep(2.5)  # the CT is stable by now too
        assert tasks_for(fhir, CT_UID) == []

    # Restart on the same store: nothing is repeated, and a study that arrives while the facade is
    # down is picked up.
    with httpx.Client(timeout=30) as client:
        upload(client, orthanc.url, build_study(study(LATE_UID, "ACC-W-3", "MR")))
    with (
        watching_facade(orthanc, database) as server,
        httpx.Client(base_url=server.base_url, timeout=30) as fhir,
    ):
        wait_for(lambda: tasks_for(fhir, LATE_UID))
        time.sleep(1.0)
        assert len(tasks_for(fhir, MR_UID)) == 1
        all_tasks = ok_json(fhir.get("/Task", params={"code": "analyze"}))
        assert all_tasks["total"] == 2
