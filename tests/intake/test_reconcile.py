"""Reconciliation of arrivals (ADR 0039), end to end with real parts: studies sent with dcmtk's
storescu to a real Orthanc, the facade watching its change feed, Patients and orders in SQLite.

- a study of a PatientID no stored Patient has -> a reconcile Task (input unknown_patient), and
  the study is held: no analysis Task;
- a study whose accession is another patient's order -> a reconcile Task (order_patient_mismatch,
  basedOn the order);
- a study that matches its Patient and order -> no reconcile Task, an analysis Task;
- completing a reconcile Task with the Patient (and order) corrects the study in Orthanc: its
  stored tags say the new identity, the Original Attributes Sequence holds the old values with
  reason CORRECT, no instance is lost, the ImagingStudy shows the EHR's patient and the order, and
  the corrected study, arriving again, is released (its analysis Task).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from fhir_facade.dicomweb.orthanc_rest import OrthancRestClient
from fhir_facade.embedded import EmbeddedOrthanc
from fhir_facade.intake.coercion import IdentityTarget
from fhir_facade.intake.reconcile import ISSUE_SYSTEM, RECONCILE_IDENTIFIER_SYSTEM
from fhir_facade.intake.reconcile_pacs import Correction, OrthancInstances, StudyCorrector
from tests.conftest import LiveServer, ok_json, outcome, serve, validate
from tests.dicom_factory import SeriesSpec, StudySpec, build_study
from tests.intake.conftest import STORE_AET

MRN_SYSTEM = "urn:oid:2.16.840.1.113883.3.3719.1.1"  # the default FACADE_PATIENT_IDENTIFIER_SYSTEM
ORDER_SYSTEM = "urn:oid:1.2.3.4.5.99"
FHIR_JSON = {"Content-Type": "application/fhir+json"}
T = TypeVar("T")


@pytest.fixture(scope="module")
def server(pacs: EmbeddedOrthanc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with serve(
        {
            "dicomweb_url": pacs.dicomweb_url,
            "orthanc_url": pacs.url,
            "watch_studies": True,
            "watch_poll_interval": 0.3,
            "task_modalities": ["MR"],
            "reading_enabled": False,
            "reconcile_require_known_patient": True,
            "audit_enabled": True,
            "data_dir": tmp_path_factory.mktemp("facade-data"),
        }
    ) as live:
        yield live


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{server.base_url}/", timeout=60, headers=FHIR_JSON) as client:
        yield client


@pytest.fixture(scope="module")
def ehr(http: httpx.Client) -> dict[str, dict[str, Any]]:
    """The EHR's Patients (one under its MRN as id, one under a server id) and their orders."""
    anna = ok_json(
        http.put(
            "Patient/MRN-100",
            json={
                "resourceType": "Patient",
                "id": "MRN-100",
                "identifier": [{"system": MRN_SYSTEM, "value": "MRN-100"}],
                "name": [{"family": "Gut", "given": ["Anna"]}],
                "birthDate": "1970-01-02",
                "gender": "female",
            },
        ),
        201,
    )
    otto = ok_json(
        http.post(
            "Patient",
            json={
                "resourceType": "Patient",
                "identifier": [{"system": MRN_SYSTEM, "value": "MRN-200"}],
                "name": [{"family": "Anders", "given": ["Otto"]}],
                "birthDate": "1960-05-06",
                "gender": "male",
            },
        ),
        201,
    )
    return {
        "anna": anna,
        "otto": otto,
        "anna_order_1": _order(http, "ACC-R-1", "Patient/MRN-100"),
        "anna_order_2": _order(http, "ACC-R-2", "Patient/MRN-100"),
        "otto_order": _order(http, "ACC-R-3", f"Patient/{otto['id']}"),
    }


def _order(http: httpx.Client, accession: str, subject: str) -> dict[str, Any]:
    return ok_json(
        http.post(
            "ServiceRequest",
            json={
                "resourceType": "ServiceRequest",
                "status": "active",
                "intent": "order",
                "identifier": [
                    {
                        "system": ORDER_SYSTEM,
                        "value": accession,
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
                "subject": {"reference": subject},
            },
        ),
        201,
    )


def storescu(pacs: EmbeddedOrthanc, spec: StudySpec, folder: Path) -> None:
    folder.mkdir()
    files = []
    for n, dataset in enumerate(build_study(spec)):
        path = folder / f"{n}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        files.append(str(path))
    done = subprocess.run(
        ["storescu", "-aet", STORE_AET, "-aec", pacs.aet, "127.0.0.1", str(pacs.dicom_port), *files],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def study(uid: str, patient_id: str, name: str, accession: str = "") -> StudySpec:
    return StudySpec(
        patient_id=patient_id,
        patient_name=name,
        birth_date="19700102",
        sex="F",
        study_uid=uid,
        accession=accession,
        study_date="20261205",
        study_time="101500",
        description="MR BRAIN",
        series=[
            SeriesSpec("MR", "AX T1", 1, body_part="BRAIN", n_instances=3),
            SeriesSpec("MR", "AX T2", 2, body_part="BRAIN", n_instances=2),
        ],
    )


def wait_for(check: Callable[[], T | None], timeout: float = 30) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.2)


def tasks(http: httpx.Client, code: str, uid: str) -> list[dict[str, Any]]:
    bundle = ok_json(http.get("Task", params={"code": code, "focus": f"ImagingStudy/{uid}"}))
    return [e["resource"] for e in bundle.get("entry", [])]


def pacs_instances(pacs: EmbeddedOrthanc, uid: str) -> list[dict[str, Any]]:
    """Every instance Orthanc holds of the study, whatever patient it is filed under, with its tags."""
    with httpx.Client(base_url=pacs.url, timeout=30) as orthanc:
        found = orthanc.post(
            "/tools/find", json={"Level": "Instance", "Query": {"StudyInstanceUID": uid}}
        ).json()
        return [orthanc.get(f"/instances/{i}/tags", params={"simplify": ""}).json() for i in found]


def resolve(http: httpx.Client, task: dict[str, Any], outputs: list[dict[str, Any]]) -> httpx.Response:
    """What a person does: take the Task, then complete it naming the Patient (and order)."""
    taken = ok_json(http.put(f"Task/{task['id']}", json={**task, "status": "in-progress"}))
    return http.put(f"Task/{task['id']}", json={**taken, "status": "completed", "output": outputs})


def reference_output(reference: str) -> dict[str, Any]:
    return {"type": {"text": "reconciled to"}, "valueReference": {"reference": reference}}


def input_codes(task: dict[str, Any]) -> set[str]:
    return {c["code"] for i in task["input"] for c in i["type"]["coding"] if c["system"] == ISSUE_SYSTEM}


def test_a_matching_arrival_is_not_held(
    pacs: EmbeddedOrthanc, http: httpx.Client, ehr: dict[str, Any], tmp_path: Path
) -> None:
    uid = "1.2.826.0.1.3680043.8.498.39.1"
    storescu(pacs, study(uid, "MRN-100", "Gut^Anna", "ACC-R-1"), tmp_path / "match")
    (analysis,) = wait_for(lambda: tasks(http, "analyze", uid))
    assert analysis["basedOn"] == [{"reference": f"ServiceRequest/{ehr['anna_order_1']['id']}"}]
    assert tasks(http, "reconcile", uid) == []


def test_an_unknown_patient_is_held_with_a_task(
    pacs: EmbeddedOrthanc, http: httpx.Client, ehr: dict[str, Any], tmp_path: Path
) -> None:
    uid = "1.2.826.0.1.3680043.8.498.39.2"
    storescu(pacs, study(uid, "WALKIN-7", "Unbekannt^Frau"), tmp_path / "unknown")
    (task,) = wait_for(lambda: tasks(http, "reconcile", uid))
    validate(task)
    assert task["status"] == "requested"
    assert task["businessStatus"]["text"] == "awaiting reconciliation"
    assert input_codes(task) == {"unknown_patient"}
    (unknown,) = task["input"]
    assert unknown["valueIdentifier"]["value"] == "WALKIN-7"
    assert task["for"] == {"reference": "Patient/WALKIN-7"}
    assert task["identifier"][0]["system"] == RECONCILE_IDENTIFIER_SYSTEM
    time.sleep(1.0)  # a few more polls: the held study gets no analysis Task
    assert tasks(http, "analyze", uid) == []


def test_an_accession_of_another_patients_order_is_held(
    pacs: EmbeddedOrthanc, http: httpx.Client, ehr: dict[str, Any], tmp_path: Path
) -> None:
    uid = "1.2.826.0.1.3680043.8.498.39.3"
    storescu(pacs, study(uid, "MRN-200", "Anders^Otto", "ACC-R-1"), tmp_path / "mismatch")
    (task,) = wait_for(lambda: tasks(http, "reconcile", uid))
    validate(task)
    assert input_codes(task) == {"order_patient_mismatch"}
    order_ref = f"ServiceRequest/{ehr['anna_order_1']['id']}"
    assert task["basedOn"] == [{"reference": order_ref}]
    assert task["input"][0]["valueReference"] == {"reference": order_ref}
    assert tasks(http, "analyze", uid) == []


def test_completing_needs_a_patient(
    pacs: EmbeddedOrthanc, http: httpx.Client, ehr: dict[str, Any], tmp_path: Path
) -> None:
    uid = "1.2.826.0.1.3680043.8.498.39.4"
    storescu(pacs, study(uid, "WALKIN-8", "Unbekannt^Herr"), tmp_path / "errors")
    (task,) = wait_for(lambda: tasks(http, "reconcile", uid))
    body = outcome(resolve(http, task, []), 422, "required")
    assert body["issue"][0]["details"]["coding"][0]["code"] == "reconcile_patient_missing"
    current = ok_json(http.get(f"Task/{task['id']}"))
    body = outcome(
        http.put(
            f"Task/{task['id']}",
            json={**current, "status": "completed", "output": [reference_output("Patient/NOBODY-1")]},
        ),
        422,
        "processing",
    )
    assert body["issue"][0]["details"]["coding"][0]["code"] == "unknown_reference"
    assert ok_json(http.get(f"Task/{task['id']}"))["status"] == "in-progress"
    assert {i["PatientID"] for i in pacs_instances(pacs, uid)} == {"WALKIN-8"}  # untouched


def test_resolving_corrects_the_study_in_the_pacs(
    pacs: EmbeddedOrthanc, http: httpx.Client, ehr: dict[str, Any], tmp_path: Path
) -> None:
    uid = "1.2.826.0.1.3680043.8.498.39.5"
    storescu(pacs, study(uid, "WALKIN-9", "Unbekannt^Frau", "OLD-ACC"), tmp_path / "resolve")
    (task,) = wait_for(lambda: tasks(http, "reconcile", uid))
    before = pacs_instances(pacs, uid)
    assert len(before) == 5
    order = ehr["anna_order_2"]
    done = ok_json(
        resolve(
            http,
            task,
            [reference_output("Patient/MRN-100"), reference_output(f"ServiceRequest/{order['id']}")],
        )
    )
    assert done["status"] == "completed"
    assert done["businessStatus"]["text"] == "corrected in the PACS"
    assert {"type": {"text": "corrected instances"}, "valueInteger": 5} in done["output"]

    after = pacs_instances(pacs, uid)
    assert len(after) == len(before)  # no instance lost, none left under the old identity
    assert {i["SOPInstanceUID"] for i in after} == {i["SOPInstanceUID"] for i in before}
    for tags in after:
        assert tags["PatientID"] == "MRN-100"
        assert tags["PatientName"] == "Gut^Anna"
        assert tags["AccessionNumber"] == "ACC-R-2"
        (item,) = tags["OriginalAttributesSequence"]
        assert item["ReasonForTheAttributeModification"] == "CORRECT"
        assert item["ModifyingSystem"] == "fhir-facade"
        assert item["SourceOfPreviousValues"] == f"Task/{task['id']}"
        (old,) = item["ModifiedAttributesSequence"]
        assert old["PatientID"] == "WALKIN-9"
        assert old["PatientName"] == "Unbekannt^Frau"
        assert old["AccessionNumber"] == "OLD-ACC"

    # The corrected study arrives again (a new Orthanc study): known patient, its order -> released.
    (analysis,) = wait_for(lambda: tasks(http, "analyze", uid))
    assert analysis["for"] == {"reference": "Patient/MRN-100"}
    imaging = ok_json(http.get(f"ImagingStudy/{uid}"))
    assert imaging["subject"]["reference"] == "Patient/MRN-100"
    assert imaging["subject"]["identifier"]["value"] == "MRN-100"
    assert imaging["basedOn"] == [{"reference": f"ServiceRequest/{order['id']}"}]
    assert ok_json(http.get("Patient/MRN-100"))["name"][0]["family"] == "Gut"  # the EHR's record
    assert len(tasks(http, "reconcile", uid)) == 1

    events = ok_json(http.get("AuditEvent", params={"entity": f"Task/{task['id']}", "_count": 50}))
    corrections = [
        e["resource"]
        for e in events.get("entry", [])
        if any(s.get("code") == "reconcile" for s in e["resource"].get("subtype", []))
    ]
    assert len(corrections) == 1
    assert "5 instance(s)" in corrections[0]["outcomeDesc"]

    # Completing it again (a replay) neither corrects nor counts anything twice.
    again = ok_json(http.put(f"Task/{task['id']}", json=done))
    assert again["output"] == done["output"]
    assert len(pacs_instances(pacs, uid)) == 5


def test_resolving_in_place_keeps_the_patient_id(
    pacs: EmbeddedOrthanc, http: httpx.Client, ehr: dict[str, Any], tmp_path: Path
) -> None:
    """Otto's study under Anna's accession, reconciled to Otto and his own order: the PatientID
    stays, so Orthanc's ids stay too and each instance is replaced in place."""
    uid = "1.2.826.0.1.3680043.8.498.39.6"
    storescu(pacs, study(uid, "MRN-200", "Anders^Otto", "ACC-R-1"), tmp_path / "in-place")
    (task,) = wait_for(lambda: tasks(http, "reconcile", uid))
    before = pacs_instances(pacs, uid)
    order = ehr["otto_order"]
    done = ok_json(
        resolve(
            http,
            task,
            [
                reference_output(f"Patient/{ehr['otto']['id']}"),
                reference_output(f"ServiceRequest/{order['id']}"),
            ],
        )
    )
    assert {"type": {"text": "corrected instances"}, "valueInteger": 5} in done["output"]
    after = pacs_instances(pacs, uid)
    assert len(after) == len(before) == 5
    for tags in after:
        assert (tags["PatientID"], tags["AccessionNumber"]) == ("MRN-200", "ACC-R-3")
        (item,) = tags["OriginalAttributesSequence"]
        (old,) = item["ModifiedAttributesSequence"]
        assert old["AccessionNumber"] == "ACC-R-1"
        assert "PatientID" not in old  # unchanged attributes are not recorded
    (analysis,) = wait_for(lambda: tasks(http, "analyze", uid))
    assert analysis["basedOn"] == [{"reference": f"ServiceRequest/{order['id']}"}]
    # Orthanc's index was re-read from the corrected files: QIDO and the feed say the new accession.
    imaging = ok_json(http.get(f"ImagingStudy/{uid}"))
    assert imaging["basedOn"] == [{"reference": f"ServiceRequest/{order['id']}"}]
    assert len(tasks(http, "reconcile", uid)) == 1  # the corrected arrival is not held again


class _FailingDelete(OrthancInstances):
    """A fault a test cannot cause in Orthanc itself: the process "dies" at its first delete,
    after the corrected copies of the round are stored (a mock of the crash, not of Orthanc)."""

    async def delete(self, instance_id: str) -> None:
        raise RuntimeError("crash before the delete")


def test_a_correction_cut_short_is_finished_by_the_next_run(
    pacs: EmbeddedOrthanc, http: httpx.Client, ehr: dict[str, Any], tmp_path: Path
) -> None:
    uid = "1.2.826.0.1.3680043.8.498.39.7"
    storescu(pacs, study(uid, "WALKIN-10", "Unbekannt^Herr"), tmp_path / "crash")
    (task,) = wait_for(lambda: tasks(http, "reconcile", uid))
    old_study = task["identifier"][0]["value"]
    target = IdentityTarget(patient_id="MRN-100", issuer_of_patient_id="", patient_name="Gut^Anna")

    async def run(pacs_calls: OrthancInstances) -> Correction:
        corrector = StudyCorrector(pacs_calls, modifying_system="fhir-facade", spool=tmp_path / "spool")
        return await corrector.correct(old_study, target, source="test")

    async def both() -> Correction:
        async with OrthancRestClient(pacs.url, timeout=30, max_connections=4) as orthanc:
            with pytest.raises(RuntimeError):
                await run(_FailingDelete(orthanc))
            # Both copies are in the PACS now: nothing was deleted before its corrected copy was stored.
            assert len(pacs_instances(pacs, uid)) == 10
            return await run(OrthancInstances(orthanc))

    done = asyncio.run(both())
    assert done.corrected == 5  # the second run re-stores (Orthanc keeps the first copy) and deletes
    after = pacs_instances(pacs, uid)
    assert len(after) == 5
    assert {i["PatientID"] for i in after} == {"MRN-100"}
    assert all(len(i["OriginalAttributesSequence"]) == 1 for i in after)
