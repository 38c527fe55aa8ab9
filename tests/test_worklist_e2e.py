"""The store/worklist issue's acceptance path, end to end with real parts:

an order POSTed with the `fhirclient` library shows up in a modality's `findscu -W`; the study sent
with dcmtk `storescu` for that accession becomes exactly one analysis Task within 5 s of being
stable (and, since ADR 0033, one reading Task beside it);
`Task?code=analyze&status=requested&_include=Task:focus` returns it with the live ImagingStudy whose basedOn
points at the order; SIGKILL of the facade between changes loses no Task and duplicates none.

The facade runs as its own process (`python -m fhir_facade serve`) so that it can be killed.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhirclient import client
from fhirclient.models.imagingstudy import ImagingStudy
from fhirclient.models.servicerequest import ServiceRequest
from fhirclient.models.task import Task

from fhir_facade.embedded import DicomPeer, EmbeddedOrthanc, free_port
from tests.conftest import validate
from tests.dicom_factory import SeriesSpec, StudySpec, build_study
from tests.facade_process import FacadeProcess, wait_for
from tests.worklist.test_findscu import TEST_MODALITY, findscu

STABLE_AGE_S = 1
STORE_AET = "MODALITY1"
ORDER_SYSTEM = "urn:oid:1.2.3.4.5.88"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[EmbeddedOrthanc, FacadeProcess]]:
    worklists = tmp_path / "worklists"
    worklists.mkdir()
    orthanc = EmbeddedOrthanc(
        tmp_path / "orthanc",
        http_port=free_port(),
        dicom_port=free_port(),
        stable_age=STABLE_AGE_S,
        worklist_dir=worklists,
        modalities=[TEST_MODALITY, DicomPeer(STORE_AET, "127.0.0.1")],
    )
    assert orthanc.credentials is not None
    port = free_port()
    env = {
        **os.environ,
        "FACADE_DICOMWEB_URL": orthanc.dicomweb_url,
        "FACADE_ORTHANC_URL": orthanc.url,
        "FACADE_PACS_USERNAME": orthanc.credentials[0],
        "FACADE_PACS_PASSWORD": orthanc.credentials[1],
        "FACADE_WORKLIST_DIR": str(worklists),
        "FACADE_DATABASE_URL": f"sqlite:///{tmp_path / 'store.sqlite3'}",
        "FACADE_BASE_URL": f"http://127.0.0.1:{port}/fhir",
        "FACADE_WATCH_POLL_INTERVAL": "0.25",
        # The restarted process is the same replica: it renews the killed one's watcher lease at
        # once instead of waiting for it to expire (ADR 0032).
        "FACADE_REPLICA_ID": "e2e-replica",
        # This test is about Tasks being created; $analyze picking them up is tested on its own.
        "FACADE_ANALYZE_ENABLED": "false",
        "FACADE_LOG_LEVEL": "WARNING",
    }
    facade = FacadeProcess(env, port)
    with orthanc:
        facade.start()
        try:
            yield orthanc, facade
        finally:
            facade.stop()


def send_with_storescu(orthanc: EmbeddedOrthanc, spec: StudySpec, folder: Path) -> None:
    folder.mkdir()
    files = []
    for n, ds in enumerate(build_study(spec)):
        path = folder / f"{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(str(path))
    done = subprocess.run(
        ["storescu", "-aet", STORE_AET, "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port), *files],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def mr_study(uid: str, accession: str) -> StudySpec:
    return StudySpec(
        patient_id="E2E-1",
        patient_name="Kern^Ida",
        study_uid=uid,
        accession=accession,
        study_date="20241120",
        study_time="091500",
        timezone_offset="+0100",
        description="MR BRAIN",
        series=[SeriesSpec("MR", "AX T1", 1, body_part="BRAIN", n_instances=3)],
    )


def analysis_tasks(base_url: str) -> list[dict[str, Any]]:
    bundle = httpx.get(f"{base_url}/Task", params={"code": "analyze", "_count": 100}, timeout=10).json()
    return [e["resource"] for e in bundle.get("entry", [])]


def test_order_to_worklist_to_task_survives_sigkill(
    stack: tuple[EmbeddedOrthanc, FacadeProcess], tmp_path: Path
) -> None:
    orthanc, facade = stack
    smart = client.FHIRClient(settings={"app_id": "e2e", "api_base": facade.base_url})
    order = ServiceRequest(
        {
            "resourceType": "ServiceRequest",
            "status": "active",
            "intent": "order",
            "priority": "urgent",
            "identifier": [
                {
                    "system": ORDER_SYSTEM,
                    "value": "ACC-E2E-77",
                    "type": {
                        "coding": [
                            {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}
                        ]
                    },
                }
            ],
            "code": {
                "coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "MR"}],
                "text": "MRI brain",
            },
            "subject": {
                "reference": "Patient/E2E-1",
                "identifier": {"value": "E2E-1"},
                "display": "Kern, Ida",
            },
            "occurrenceDateTime": "2024-11-20T09:00:00+01:00",
        }
    )
    created = order.create(smart.server)
    assert created is not None
    order_id = created["id"]

    (item,) = findscu(orthanc, tmp_path / "mwl", AccessionNumber="ACC-E2E-77")
    assert item.PatientID == "E2E-1" and item.ScheduledProcedureStepSequence[0].Modality == "MR"

    first_uid = "1.2.826.0.1.3680043.8.498.88.1"
    send_with_storescu(orthanc, mr_study(first_uid, "ACC-E2E-77"), tmp_path / "first")
    sent = time.monotonic()
    wait_for(lambda: analysis_tasks(facade.base_url), timeout=STABLE_AGE_S + 5 + 1)
    assert time.monotonic() - sent <= STABLE_AGE_S + 5, "Task not within 5 s of the study being stable"

    # The worklist query, through fhirclient: the Task with its live focus and the order.
    search = Task.where({"code": "analyze", "status": "requested"}).include("focus")
    bundle = next(iter(search.perform_iter(smart.server)))
    validate(bundle.as_json())
    tasks = [e.resource for e in bundle.entry if e.search.mode == "match"]
    studies = [e.resource for e in bundle.entry if e.search.mode == "include"]
    assert len(tasks) == 1 and tasks[0].basedOn[0].reference == f"ServiceRequest/{order_id}"
    assert isinstance(studies[0], ImagingStudy) and studies[0].id == first_uid
    assert studies[0].basedOn[0].reference == f"ServiceRequest/{order_id}"
    assert studies[0].numberOfInstances == 3

    # SIGKILL between changes, a study arrives while the facade is down, restart.
    facade.kill()
    second_uid = "1.2.826.0.1.3680043.8.498.88.2"
    send_with_storescu(orthanc, mr_study(second_uid, "ACC-E2E-78"), tmp_path / "second")
    time.sleep(STABLE_AGE_S + 1)
    facade.start()
    wait_for(lambda: len(analysis_tasks(facade.base_url)) >= 2, timeout=15)
    time.sleep(1.5)  # more polls: a duplicate would show up now
    focuses = sorted(t["focus"]["reference"] for t in analysis_tasks(facade.base_url))
    assert focuses == [f"ImagingStudy/{first_uid}", f"ImagingStudy/{second_uid}"]
