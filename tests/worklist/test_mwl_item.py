"""ServiceRequest -> Modality Worklist item mapping (DICOM PS3.4 K.6-1), without a PACS."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.servicerequest import ServiceRequest
from pydicom.uid import ExplicitVRLittleEndian

from fhir_facade.worklist import (
    DCM_SYSTEM,
    MODALITY_WORKLIST_FIND,
    WorklistFolder,
    WorklistMappingError,
    sync_service_request,
    worklist_item,
)

SNOMED = "http://snomed.info/sct"
ACSN = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}


def service_request(**changes: Any) -> dict[str, Any]:
    """A valid R4 imaging order; `changes` replace or (value None) drop top-level elements."""
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": "sr-ct-head-1",
        "identifier": [
            {"system": "urn:oid:1.2.3.4.5.6", "value": "PLAC-77"},
            {"system": "urn:oid:1.2.3.4.5.7", "type": ACSN, "value": "ACC0001"},
        ],
        "status": "active",
        "intent": "order",
        "priority": "urgent",
        "code": {
            "coding": [
                {"system": SNOMED, "code": "303653007", "display": "CT of head"},
                {"system": DCM_SYSTEM, "code": "CT", "display": "Computed Tomography"},
            ],
            "text": "CT Kopf nativ",
        },
        "subject": {
            "reference": "Patient/p1",
            "identifier": {"system": "urn:oid:1.2.3.4.5", "value": "PID-1"},
            "display": "Jörg Müller",
        },
        "occurrenceDateTime": "2024-05-01T09:30:00+02:00",
        "requester": {"display": "Dr. Anna Schmidt"},
    }
    for key, value in changes.items():
        if value is None:
            resource.pop(key, None)
        else:
            resource[key] = value
    ServiceRequest.model_validate(resource)
    return resource


PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "p1",
    "identifier": [{"system": "urn:oid:1.2.3.4.5", "value": "PID-FROM-PATIENT"}],
    "name": [
        {"use": "old", "family": "Meier", "given": ["Jörg"]},
        {"use": "official", "family": "Müller", "given": ["Jörg", "Peter"], "prefix": ["Dr."]},
    ],
    "gender": "male",
    "birthDate": "1970-03-15",
}


def test_item_maps_the_order_and_patient() -> None:
    Patient.model_validate(PATIENT)
    ds = worklist_item(service_request(), PATIENT, station_ae_title="CT01")

    assert ds.file_meta.MediaStorageSOPClassUID == MODALITY_WORKLIST_FIND
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert ds.PatientID == "PID-1"  # subject.identifier wins over the Patient's identifier
    assert str(ds.PatientName) == "Müller^Jörg^Peter^Dr."
    assert ds.PatientBirthDate == "19700315"
    assert ds.PatientSex == "M"
    assert ds.AccessionNumber == "ACC0001"
    assert ds.RequestedProcedureDescription == "CT Kopf nativ"
    assert [
        (c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning) for c in ds.RequestedProcedureCodeSequence
    ] == [("303653007", "SCT", "CT of head")]  # a single item (PS3.3 C.4.11)
    assert ds.RequestedProcedureID == "sr-ct-head-1"
    assert ds.RequestedProcedurePriority == "HIGH"
    assert str(ds.ReferringPhysicianName) == "Dr. Anna Schmidt"
    assert ds.TimezoneOffsetFromUTC == "+0200"
    (step,) = ds.ScheduledProcedureStepSequence
    assert step.Modality == "CT"
    assert step.ScheduledStationAETitle == "CT01"
    assert step.ScheduledProcedureStepStartDate == "20240501"
    assert step.ScheduledProcedureStepStartTime == "093000"
    assert step.ScheduledProcedureStepDescription == "CT Kopf nativ"
    assert step.ScheduledProcedureStepID == "sr-ct-head-1"


def test_item_round_trips_as_utf8_part10_file() -> None:
    buffer = io.BytesIO()
    worklist_item(service_request(), PATIENT).save_as(buffer, enforce_file_format=True)
    assert "Müller".encode() in buffer.getvalue()
    read = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert str(read.PatientName) == "Müller^Jörg^Peter^Dr."
    assert read.file_meta.MediaStorageSOPClassUID == MODALITY_WORKLIST_FIND


def test_without_patient_uses_subject_display_and_leaves_type2_empty() -> None:
    ds = worklist_item(service_request(priority=None))
    assert str(ds.PatientName) == "Jörg Müller"
    assert ds.PatientBirthDate == ""
    assert ds.PatientSex == ""
    assert ds.RequestedProcedurePriority == ""
    assert ds.ScheduledProcedureStepSequence[0].ScheduledStationAETitle == "ANY-SCU"


def test_patient_identifier_used_when_subject_has_none() -> None:
    ds = worklist_item(service_request(subject={"reference": "Patient/p1"}), PATIENT)
    assert ds.PatientID == "PID-FROM-PATIENT"


def test_first_identifier_when_none_is_typed_acsn() -> None:
    ds = worklist_item(service_request(identifier=[{"system": "urn:oid:1.2.3", "value": "FIRST"}]))
    assert ds.AccessionNumber == "FIRST"


@pytest.mark.parametrize(
    ("priority", "expected"),
    [("stat", "STAT"), ("asap", "HIGH"), ("urgent", "HIGH"), ("routine", "ROUTINE")],
)
def test_priority_map(priority: str, expected: str) -> None:
    assert worklist_item(service_request(priority=priority)).RequestedProcedurePriority == expected


@pytest.mark.parametrize(
    ("occurrence", "date", "time", "offset"),
    [
        ({"occurrenceDateTime": "2024-05-01T23:30:00-05:00"}, "20240501", "233000", "-0500"),
        ({"occurrenceDateTime": "2024-12-31T08:05:09.250Z"}, "20241231", "080509.25", "+0000"),
        ({"occurrencePeriod": {"start": "2024-06-02T07:00:00+05:30"}}, "20240602", "070000", "+0530"),
        ({"occurrenceDateTime": "2024-05-01"}, "20240501", "", None),
    ],
)
def test_start_keeps_local_time_of_its_offset(
    occurrence: dict[str, Any], date: str, time: str, offset: str | None
) -> None:
    ds = worklist_item(service_request(**{"occurrenceDateTime": None, **occurrence}))
    step = ds.ScheduledProcedureStepSequence[0]
    assert (step.ScheduledProcedureStepStartDate, step.ScheduledProcedureStepStartTime) == (date, time)
    assert ds.get("TimezoneOffsetFromUTC") == offset


def test_modality_from_order_detail_or_category() -> None:
    code = {"coding": [{"system": SNOMED, "code": "241615005", "display": "MRI of head"}]}
    detail = [{"coding": [{"system": DCM_SYSTEM, "code": "MR"}]}]
    ds = worklist_item(service_request(code=code, orderDetail=detail))
    assert ds.ScheduledProcedureStepSequence[0].Modality == "MR"
    assert ds.RequestedProcedureDescription == "MRI of head"
    ds = worklist_item(
        service_request(code=code, category=[{"coding": [{"system": DCM_SYSTEM, "code": "US"}]}])
    )
    assert ds.ScheduledProcedureStepSequence[0].Modality == "US"


def test_missing_modality_is_a_mapping_error_with_expression() -> None:
    # A numeric DCM concept code is not an acquisition modality (CID 29).
    code = {"coding": [{"system": SNOMED, "code": "303653007"}, {"system": DCM_SYSTEM, "code": "110150"}]}
    with pytest.raises(WorklistMappingError, match="modality") as caught:
        worklist_item(service_request(code=code))
    assert caught.value.expression == "ServiceRequest.code"
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("changes", "expression"),
    [
        ({"occurrenceDateTime": None}, "ServiceRequest.occurrence"),
        (
            {"occurrenceDateTime": None, "occurrencePeriod": {"end": "2024-05-01"}},
            "ServiceRequest.occurrencePeriod.start",
        ),
        ({"occurrenceDateTime": "2024-05"}, "ServiceRequest.occurrenceDateTime"),
        ({"subject": {"reference": "Patient/p1", "display": "X"}}, "ServiceRequest.subject.identifier"),
        ({"subject": {"identifier": {"value": "PID-1"}}}, "ServiceRequest.subject"),
        ({"id": None}, "ServiceRequest.id"),
    ],
)
def test_missing_type1_keys_name_the_element(changes: dict[str, Any], expression: str) -> None:
    with pytest.raises(WorklistMappingError) as caught:
        worklist_item(service_request(**changes))
    assert caught.value.expression == expression


def test_study_uid_is_stable_per_order_and_distinct_between_orders() -> None:
    first = worklist_item(service_request()).StudyInstanceUID
    assert worklist_item(service_request(priority="stat")).StudyInstanceUID == first
    assert worklist_item(service_request(id="sr-ct-head-2")).StudyInstanceUID != first
    assert len(first) <= 64


def test_study_uid_given_by_the_order_wins() -> None:
    identifiers = [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.840.99.1"}]
    ds = worklist_item(service_request(identifier=identifiers))
    assert ds.StudyInstanceUID == "1.2.840.99.1"
    assert ds.AccessionNumber == ""


def test_long_ids_fit_short_string() -> None:
    ds = worklist_item(service_request(id="a" * 64))
    assert len(ds.RequestedProcedureID) == 16
    assert ds.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID == ds.RequestedProcedureID


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="station_ae_title"):
        worklist_item(service_request(), station_ae_title="A" * 17)
    with pytest.raises(ValueError, match="patient must be a Patient"):
        worklist_item(service_request(), {"resourceType": "Practitioner"})
    with pytest.raises(ValueError, match="service_request"):
        worklist_item({"resourceType": "Task"})


@pytest.mark.parametrize(
    ("status", "intent", "had_item", "result", "has_item"),
    [
        ("active", "order", False, "written", True),
        ("active", "original-order", True, "written", True),
        ("active", "proposal", False, "skipped", False),
        ("active", "plan", False, "skipped", False),
        ("draft", "order", False, "skipped", False),
        ("on-hold", "order", True, "removed", False),
        ("revoked", "order", True, "removed", False),
        ("completed", "order", True, "removed", False),
        ("entered-in-error", "order", True, "removed", False),
        ("revoked", "order", False, "skipped", False),
        ("unknown", "order", True, "skipped", True),
    ],
)
def test_sync_follows_request_status(
    tmp_path: Path, status: str, intent: str, had_item: bool, result: str, has_item: bool
) -> None:
    folder = WorklistFolder(tmp_path / "wl")
    order = service_request(status=status, intent=intent)
    if had_item:
        folder.write(order["id"], worklist_item(service_request()))
    assert sync_service_request(folder, order, None) == result
    assert folder.list_ids() == ([order["id"]] if has_item else [])


def test_folder_writes_atomically_named_files(tmp_path: Path) -> None:
    folder = WorklistFolder(tmp_path)
    path = folder.write("sr-1", worklist_item(service_request(id="sr-1")))
    assert path == tmp_path / "sr-1.wl"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sr-1.wl"]  # no temporary left behind
    assert pydicom.dcmread(path).RequestedProcedureID == "sr-1"
    assert folder.list_ids() == ["sr-1"]
    assert folder.remove("sr-1") is True
    assert folder.remove("sr-1") is False
    with pytest.raises(ValueError, match="service_request_id"):
        folder.write("../escape", worklist_item(service_request()))
