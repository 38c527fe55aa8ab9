"""ImagingStudy/$import against a real Orthanc: single files (pydicom's test files, broken ones
included), multipart/related, zips with folders, a DICOMDIR and other files, the same archive twice,
the asynchronous form with X-Progress, and the coercion to the EHR's Patient and order."""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pydicom.data
import pytest

from fhir_facade.embedded import EmbeddedOrthanc
from tests import dicom_factory
from tests.conftest import LiveServer, ok_json, outcome, serve
from tests.intake.conftest import multipart_related, valid_ct_study, zip_of

DICOM = {"Content-Type": "application/dicom"}
ZIP = {"Content-Type": "application/zip"}
FINAL = ("stored", "stored-with-warnings", "already-stored", "refused", "skipped")


@pytest.fixture(scope="module")
def facade(pacs: EmbeddedOrthanc) -> Iterator[LiveServer]:
    with serve({"dicomweb_url": pacs.dicomweb_url, "orthanc_url": pacs.url}) as server:
        yield server


@pytest.fixture
def fhir(facade: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=facade.base_url, timeout=120) as client:
        yield client


@pytest.fixture
def orthanc(pacs: EmbeddedOrthanc) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pacs.url, timeout=30) as client:
        yield client


def instances(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each `instance` parameter as {entry, status, sopInstanceUid, reasons}."""
    found = []
    for parameter in result["parameter"]:
        if parameter["name"] != "instance":
            continue
        item: dict[str, Any] = {"reasons": []}
        for part in parameter["part"]:
            value = next(v for k, v in part.items() if k.startswith("value"))
            if part["name"] == "reason":
                item["reasons"].append(value)
            else:
                item[part["name"]] = value
        found.append(item)
    return found


def summary(result: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["valueInteger"] for p in result["parameter"][0]["part"]}


def in_pacs(orthanc: httpx.Client, sop_uid: str) -> list[str]:
    answer = orthanc.post("/tools/lookup", content=sop_uid)
    return [r["ID"] for r in answer.json() if r["Type"] == "Instance"]


def test_a_single_file_is_validated_and_stored(fhir: httpx.Client, orthanc: httpx.Client) -> None:
    ds = valid_ct_study("SINGLE-1", n_instances=1)[0]
    result = ok_json(fhir.post("ImagingStudy/$import", content=dicom_factory.to_bytes(ds), headers=DICOM))
    [item] = instances(result)
    assert item["status"] in ("stored", "stored-with-warnings"), item
    assert in_pacs(orthanc, ds.SOPInstanceUID)
    study = next(p for p in result["parameter"] if p["name"] == "study")
    assert {
        "name": "imagingStudy",
        "valueReference": {"reference": f"ImagingStudy/{ds.StudyInstanceUID}"},
    } in (study["part"])


def test_every_pydicom_test_file_gets_an_answer_and_broken_ones_a_reason(fhir: httpx.Client) -> None:
    """0 crashes: every file of pydicom's test set (broken ones, non-DICOM ones, DICOMDIRs) gets a
    200 with its per-instance result; every refusal says why."""
    files = sorted(Path(p) for p in pydicom.data.get_testdata_files() if Path(p).is_file())
    assert len(files) > 80
    refused: dict[str, list[str]] = {}
    for path in files:
        response = fhir.post("ImagingStudy/$import", content=path.read_bytes(), headers=DICOM)
        assert response.status_code == 200, (path.name, response.text)
        [item] = instances(response.json())
        assert item["status"] in FINAL
        if item["status"] == "refused":
            assert item["reasons"] and all(item["reasons"]), path.name
            refused[path.name] = item["reasons"]
    # Files known to be broken in the way the validation looks for:
    assert any("DICM" in r for r in refused["no_meta.dcm"])
    assert any("SOPInstanceUID is missing" in r for r in refused["nested_priv_SQ.dcm"])
    assert any("NumberOfFrames" in r for r in refused["liver_1frame.dcm"])
    assert any("after the end of the file" in r for r in refused["MR_truncated.dcm"])
    assert "CT_small.dcm" not in refused


def test_a_zip_with_folders_dicomdir_and_other_files_then_again(
    fhir: httpx.Client, orthanc: httpx.Client
) -> None:
    good = valid_ct_study("ZIP-GOOD", n_instances=3)
    bad = valid_ct_study("ZIP-BAD", n_instances=2)
    bad[1].PixelData = bad[1].PixelData[:-20]  # 20 bytes short of Rows x Columns x 16 bits
    files = {f"PATIENT/STUDY/SERIES{i // 2}/IM{i}": dicom_factory.to_bytes(ds) for i, ds in enumerate(good)}
    files.update({f"other/deeper/b{i}.dcm": dicom_factory.to_bytes(ds) for i, ds in enumerate(bad)})
    files["DICOMDIR"] = b"\0" * 128 + b"DICM" + b"not really"
    files["README.txt"] = b"burnt by the modality"
    archive = zip_of(files)

    first = ok_json(fhir.post("ImagingStudy/$import", content=archive, headers=ZIP))
    by_entry = {i["entry"]: i for i in instances(first)}
    assert summary(first)["skipped"] == 2
    assert "DICOMDIR" in by_entry["DICOMDIR"]["reasons"][0]
    assert "not a DICOM" in by_entry["README.txt"]["reasons"][0]
    assert any("Pixel Data holds" in r for r in by_entry["other/deeper/b1.dcm"]["reasons"])
    # Its study is stored whole or not at all: the valid instance of it is refused too.
    assert by_entry["other/deeper/b0.dcm"]["status"] == "refused"
    assert "stored whole" in by_entry["other/deeper/b0.dcm"]["reasons"][0]
    assert not in_pacs(orthanc, bad[0].SOPInstanceUID)
    assert all(in_pacs(orthanc, ds.SOPInstanceUID) for ds in good)
    assert summary(first)["stored"] + summary(first)["stored-with-warnings"] == 3
    before = len(orthanc.get("/instances").json())

    second = ok_json(fhir.post("ImagingStudy/$import", content=archive, headers=ZIP))
    assert summary(second)["already-stored"] == 3
    assert summary(second)["stored"] == summary(second)["stored-with-warnings"] == 0
    assert len(orthanc.get("/instances").json()) == before


def test_more_entries_than_slots_in_upload_order_and_a_corrupt_member(
    fhir: httpx.Client, orthanc: httpx.Client
) -> None:
    """Entries are read ahead in parallel and held in a bounded number of slots (28 with 4 store
    connections): 40 instances pass through them, answered in upload order; a member whose deflate
    stream is damaged is skipped with the reason, and the rest of the zip is imported."""
    study = valid_ct_study("SLOTS-1", n_instances=40)
    files = {f"SLOTS/{i:03d}.dcm": dicom_factory.to_bytes(ds) for i, ds in enumerate(study)}
    archive = bytearray(zip_of({**files, "DAMAGED/x.dcm": dicom_factory.to_bytes(study[0])}))
    with zipfile.ZipFile(io.BytesIO(bytes(archive))) as reader:
        info = reader.getinfo("DAMAGED/x.dcm")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    middle = start + info.compress_size // 2
    archive[middle : middle + 16] = bytes(b ^ 0xFF for b in archive[middle : middle + 16])

    result = ok_json(fhir.post("ImagingStudy/$import", content=bytes(archive), headers=ZIP))
    items = instances(result)
    assert [i["entry"] for i in items] == [*files, "DAMAGED/x.dcm"]
    assert summary(result)["stored"] + summary(result)["stored-with-warnings"] == 40
    assert items[-1]["status"] == "skipped"
    assert items[-1]["reasons"][0].startswith("could not be read from the zip"), items[-1]
    assert all(in_pacs(orthanc, ds.SOPInstanceUID) for ds in study)


def test_multipart_related(fhir: httpx.Client, orthanc: httpx.Client) -> None:
    study = valid_ct_study("MULTI-1", n_instances=2)
    body, content_type = multipart_related([dicom_factory.to_bytes(ds) for ds in study])
    result = ok_json(fhir.post("ImagingStudy/$import", content=body, headers={"Content-Type": content_type}))
    assert [i["entry"] for i in instances(result)] == ["part 1", "part 2"]
    assert all(in_pacs(orthanc, ds.SOPInstanceUID) for ds in study)


def test_other_media_types_are_415(fhir: httpx.Client) -> None:
    outcome(
        fhir.post("ImagingStudy/$import", content=b"{}", headers={"Content-Type": "text/plain"}),
        415,
        "not-supported",
    )
    outcome(fhir.post("ImagingStudy/$import", content=b"PK nope", headers=ZIP), 400, "invalid")


def test_asynchronous_import_reports_progress(fhir: httpx.Client, orthanc: httpx.Client) -> None:
    study = valid_ct_study("ASYNC-1", n_instances=150, rows=64, cols=64)
    archive = zip_of({f"s/{i}.dcm": dicom_factory.to_bytes(ds) for i, ds in enumerate(study)})
    accepted = fhir.post("ImagingStudy/$import", content=archive, headers={**ZIP, "Prefer": "respond-async"})
    assert accepted.status_code == 202, accepted.text
    status_url = accepted.headers["Content-Location"]
    progress: list[str] = []
    deadline = time.monotonic() + 120
    while True:
        poll = fhir.get(status_url)
        if poll.status_code != 202:
            break
        progress.append(poll.headers["X-Progress"])
        assert time.monotonic() < deadline
        time.sleep(0.1)
    result = ok_json(poll)
    assert progress, "the job finished before the first poll"
    assert summary(result)["stored"] + summary(result)["stored-with-warnings"] == 150
    assert in_pacs(orthanc, study[-1].SOPInstanceUID)


def test_coercion_to_the_ehr_patient_and_order(
    fhir: httpx.Client, orthanc: httpx.Client, facade: LiveServer
) -> None:
    system = facade.app.state.settings.patient_identifier_system
    patient = ok_json(
        fhir.post(
            "Patient",
            json={
                "resourceType": "Patient",
                "identifier": [{"system": system, "value": "MRN-7788"}],
                "name": [{"family": "Ehrfeld", "given": ["Anna"]}],
                "birthDate": "1980-02-03",
                "gender": "female",
            },
        ),
        201,
    )
    order = ok_json(
        fhir.post(
            "ServiceRequest",
            json={
                "resourceType": "ServiceRequest",
                "status": "active",
                "intent": "order",
                "subject": {"reference": f"Patient/{patient['id']}"},
                "code": {"text": "CT chest"},
                "identifier": [
                    {
                        "type": {
                            "coding": [
                                {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}
                            ]
                        },
                        "system": "urn:oid:1.2.3.99",
                        "value": "ACC-4455",
                    }
                ],
            },
        ),
        201,
    )
    study = valid_ct_study("MODALITY-ID", "Wrong^Name", n_instances=2)
    archive = zip_of({f"{i}.dcm": dicom_factory.to_bytes(ds) for i, ds in enumerate(study)})
    result = ok_json(
        fhir.post(
            "ImagingStudy/$import",
            params={"patient": f"Patient/{patient['id']}", "order": f"ServiceRequest/{order['id']}"},
            content=archive,
            headers=ZIP,
        )
    )
    items = instances(result)
    assert all(i["status"] == "stored-with-warnings" for i in items), items
    assert all(any("coerced PatientID" in r for r in i["reasons"]) for i in items)

    [pacs_id] = in_pacs(orthanc, study[0].SOPInstanceUID)
    stored = pydicom.dcmread(__import__("io").BytesIO(orthanc.get(f"/instances/{pacs_id}/file").content))
    assert stored.PatientID == "MRN-7788"
    assert str(stored.PatientName) == "Ehrfeld^Anna"
    assert stored.PatientBirthDate == "19800203"
    assert stored.PatientSex == "F"
    assert stored.AccessionNumber == "ACC-4455"
    [item] = stored.OriginalAttributesSequence
    assert item.ReasonForTheAttributeModification == "COERCE"
    previous = item.ModifiedAttributesSequence[0]
    assert previous.PatientID == "MODALITY-ID"
    assert str(previous.PatientName) == "Wrong^Name"

    imaging_study = ok_json(fhir.get(f"ImagingStudy/{study[0].StudyInstanceUID}"))
    assert imaging_study["subject"]["identifier"]["value"] == "MRN-7788"
    assert {"reference": f"ServiceRequest/{order['id']}"} in [
        {"reference": b["reference"]} for b in imaging_study.get("basedOn", [])
    ]

    # The same upload for the same patient and order again: nothing stored twice.
    again = ok_json(
        fhir.post(
            "ImagingStudy/$import",
            params={"patient": f"Patient/{patient['id']}", "order": f"ServiceRequest/{order['id']}"},
            content=archive,
            headers=ZIP,
        )
    )
    assert summary(again)["already-stored"] == 2


def test_unknown_patient_and_parameters(fhir: httpx.Client) -> None:
    body = dicom_factory.to_bytes(valid_ct_study("X-1", n_instances=1)[0])
    outcome(
        fhir.post("ImagingStudy/$import", params={"patient": "Patient/nobody"}, content=body, headers=DICOM),
        404,
        "not-found",
    )
    outcome(
        fhir.post("ImagingStudy/$import", params={"colour": "red"}, content=body, headers=DICOM),
        400,
        "invalid",
    )


def test_a_study_the_pacs_cannot_take_whole_is_taken_back(fhir: httpx.Client, orthanc: httpx.Client) -> None:
    """A store failure (here: another instance under one of the UIDs is already in the PACS, put there
    directly) takes back what the import stored of that study, and says which instance failed."""
    study = valid_ct_study("ROLLBACK-1", n_instances=3)
    other = dicom_factory.to_bytes(study[1])
    changed = pydicom.dcmread(__import__("io").BytesIO(other))
    changed.SeriesDescription = "a different copy"
    orthanc.post("/instances", content=dicom_factory.to_bytes(changed)).raise_for_status()
    archive = zip_of({f"{i}.dcm": dicom_factory.to_bytes(ds) for i, ds in enumerate(study)})

    result = ok_json(fhir.post("ImagingStudy/$import", content=archive, headers=ZIP))
    by_entry = {i["entry"]: i for i in instances(result)}
    assert all(i["status"] == "refused" for i in by_entry.values()), by_entry
    assert "another instance with this SOP Instance UID is in the PACS" in by_entry["1.dcm"]["reasons"][0]
    assert "1.dcm of the same study failed" in by_entry["0.dcm"]["reasons"][0]
    assert not in_pacs(orthanc, study[0].SOPInstanceUID)
    assert not in_pacs(orthanc, study[2].SOPInstanceUID)
    assert len(in_pacs(orthanc, study[1].SOPInstanceUID)) == 1  # the PACS's own copy is kept


def test_an_import_under_a_foreign_mrn_too_long_for_a_patient_id_leaves_search_working(
    fhir: httpx.Client, orthanc: httpx.Client
) -> None:
    """An MRN of a system that is no OID becomes IssuerOfPatientID as it is; (issuer, PatientID)
    then encodes to more than a FHIR id holds, so that DICOM-view Patient has no id. Searching by
    the MRN (what the app's Upload page does) answers 200 without it, not 500."""
    system = "http://hospital.example.org/identifiers/medical-record-numbers"
    body = dicom_factory.to_bytes(valid_ct_study("FOREIGN-SRC", n_instances=1)[0])
    result = ok_json(
        fhir.post(
            "ImagingStudy/$import",
            params={"patient-identifier": f"{system}|MRN-FOREIGN-1"},
            content=body,
            headers=DICOM,
        )
    )
    assert summary(result)["stored-with-warnings"] == 1
    found = ok_json(fhir.get("Patient", params={"identifier": "MRN-FOREIGN-1"}))
    assert found["resourceType"] == "Bundle"
    assert all("id" in e["resource"] for e in found.get("entry", []))
