"""Worklist items written for FHIR ServiceRequests are served by a real Orthanc (ModalityWorklists
plugin) to a real modality-side C-FIND: dcmtk `findscu -W` (DICOM PS3.4 K.4.1.2)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.servicerequest import ServiceRequest
from pydicom.dataset import Dataset

from fhir_facade.embedded import DicomPeer, EmbeddedOrthanc, free_port
from fhir_facade.worklist import DCM_SYSTEM, WorklistFolder, sync_service_request

ACSN = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}
CALLING_AET = "FHIRTEST-SCU"
#: The modality these tests play: Orthanc admits only listed AE titles, from their listed address.
TEST_MODALITY = DicomPeer(CALLING_AET, "127.0.0.1")
RETURN_KEYS = (
    "PatientID",
    "PatientName",
    "AccessionNumber",
    "RequestedProcedureDescription",
    "ScheduledProcedureStepSequence[0].Modality",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime",
    "ScheduledProcedureStepSequence[0].ScheduledStationAETitle",
)


def order(request_id: str, accession: str, modality: str, when: str, patient_id: str) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": request_id,
        "identifier": [{"system": "urn:oid:1.2.3.4.5.7", "type": ACSN, "value": accession}],
        "status": "active",
        "intent": "order",
        "priority": "routine",
        "code": {
            "coding": [{"system": DCM_SYSTEM, "code": modality}],
            "text": f"{modality} Kopf",
        },
        "subject": {"reference": f"Patient/{patient_id}", "identifier": {"value": patient_id}},
        "occurrenceDateTime": when,
    }
    ServiceRequest.model_validate(resource)
    return resource


def patient(patient_id: str, family: str, given: str) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Patient",
        "id": patient_id,
        "identifier": [{"value": patient_id}],
        "name": [{"family": family, "given": [given]}],
    }
    Patient.model_validate(resource)
    return resource


CT_ORDER = order("sr-ct-1", "ACC-CT-1", "CT", "2024-05-01T09:30:00+02:00", "PID-CT")
CT_PATIENT = patient("PID-CT", "Müller", "Jörg")
MR_ORDER = order("sr-mr-2", "ACC-MR-2", "MR", "2024-05-02T14:05:00-04:00", "PID-MR")
MR_PATIENT = patient("PID-MR", "Øster", "Åsa")


@pytest.fixture(scope="module")
def worklist_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedOrthanc, Path]]:
    worklists = tmp_path_factory.mktemp("worklists")
    instance = EmbeddedOrthanc(
        tmp_path_factory.mktemp("orthanc-mwl"),
        http_port=free_port(),
        dicom_port=free_port(),
        worklist_dir=worklists,
        modalities=[TEST_MODALITY],
    )
    with instance:
        yield instance, worklists


def findscu(orthanc: EmbeddedOrthanc, out: Path, **matching: str) -> list[Dataset]:
    """Run a Modality Worklist C-FIND with dcmtk and read the extracted responses (-X) with pydicom."""
    out.mkdir()
    keys = [arg for key in RETURN_KEYS for arg in ("-k", key)]
    keys += [arg for key, value in matching.items() for arg in ("-k", f"{key}={value}")]
    command = [
        "findscu",
        "-W",
        "-aet",
        CALLING_AET,
        "-aec",
        orthanc.aet,
        "127.0.0.1",
        str(orthanc.dicom_port),
    ]
    completed = subprocess.run(
        [*command, *keys, "-od", str(out), "-X"], capture_output=True, text=True, timeout=30, check=False
    )
    assert completed.returncode == 0, completed.stderr
    responses = [pydicom.dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]
    return sorted(responses, key=lambda ds: str(ds.PatientID))


def test_findscu_sees_written_items_and_not_revoked_ones(
    worklist_orthanc: tuple[EmbeddedOrthanc, Path], tmp_path: Path
) -> None:
    orthanc, worklists = worklist_orthanc
    folder = WorklistFolder(worklists)
    assert sync_service_request(folder, CT_ORDER, CT_PATIENT, station_ae_title="CT01") == "written"
    assert sync_service_request(folder, MR_ORDER, MR_PATIENT, station_ae_title="MR01") == "written"
    assert folder.list_ids() == ["sr-ct-1", "sr-mr-2"]

    ct, mr = findscu(orthanc, tmp_path / "all")
    assert ct.SpecificCharacterSet == "ISO_IR 192"
    assert (ct.PatientID, str(ct.PatientName), ct.AccessionNumber) == ("PID-CT", "Müller^Jörg", "ACC-CT-1")
    assert ct.RequestedProcedureDescription == "CT Kopf"
    ct_step = ct.ScheduledProcedureStepSequence[0]
    assert ct_step.Modality == "CT"
    assert ct_step.ScheduledProcedureStepStartDate == "20240501"
    assert ct_step.ScheduledProcedureStepStartTime == "093000"
    assert ct_step.ScheduledStationAETitle == "CT01"
    assert (mr.PatientID, str(mr.PatientName), mr.AccessionNumber) == ("PID-MR", "Øster^Åsa", "ACC-MR-2")
    assert mr.RequestedProcedureDescription == "MR Kopf"
    mr_step = mr.ScheduledProcedureStepSequence[0]
    assert mr_step.Modality == "MR"
    assert mr_step.ScheduledProcedureStepStartDate == "20240502"
    assert mr_step.ScheduledProcedureStepStartTime == "140500"
    assert mr_step.ScheduledStationAETitle == "MR01"

    (only,) = findscu(orthanc, tmp_path / "by-accession", AccessionNumber="ACC-MR-2")
    assert only.PatientID == "PID-MR"

    revoked = {**CT_ORDER, "status": "revoked"}
    ServiceRequest.model_validate(revoked)
    assert sync_service_request(folder, revoked, CT_PATIENT) == "removed"
    assert folder.list_ids() == ["sr-mr-2"]
    assert [ds.PatientID for ds in findscu(orthanc, tmp_path / "after-revoke")] == ["PID-MR"]
    assert findscu(orthanc, tmp_path / "revoked-accession", AccessionNumber="ACC-CT-1") == []
