"""Identity coercion (PS3.3 C.12.1.1.9) and the identity read from the EHR's Patient and order."""

from __future__ import annotations

from datetime import UTC, datetime
from io import BytesIO
from zoneinfo import ZoneInfo

import pydicom
import pytest
from pydicom.dataset import Dataset

from fhir_facade.dicom_to_fhir.context import MappingContext
from fhir_facade.intake.coercion import IdentityTarget, coerce_identity
from fhir_facade.intake.identity import IdentityNotDerivable, identity_from_fhir, identity_from_identifier
from tests.dicom_factory import SeriesSpec, StudySpec, build_study, to_bytes

OWN_SYSTEM = "urn:oid:2.16.840.1.113883.3.3719.1.1"
CTX = MappingContext(
    patient_identifier_system=OWN_SYSTEM,
    issuer_systems={"HOSP_A": "http://hospital-a.example.org/mrn"},
    default_timezone=ZoneInfo("Europe/Berlin"),
    dicomweb_url="http://pacs.example.org/dicom-web/",
)
WHEN = datetime(2026, 12, 5, 16, 0, 0, tzinfo=UTC)
PATIENT = {
    "resourceType": "Patient",
    "id": "p1",
    "identifier": [
        {"system": "http://other.example.org/ids", "value": "X-9"},
        {
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
            "system": OWN_SYSTEM,
            "value": "MRN-42",
        },
    ],
    "name": [{"use": "official", "family": "Doe", "given": ["Jane", "Q"]}],
    "birthDate": "1970-05-17",
    "gender": "female",
}
ORDER = {
    "resourceType": "ServiceRequest",
    "identifier": [
        {
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
            "value": "ACC-777",
        }
    ],
}


def _cd_dataset() -> Dataset:
    """An instance as it comes from another hospital's CD: their id, their issuer, their accession."""
    spec = StudySpec(
        patient_id="EXT-1",
        patient_name="DOE^J",
        sex="F",
        issuer_of_patient_id="OTHER_HOSPITAL",
        study_uid="1.2.826.0.1.3680043.8.498.77",
        accession="EXT-ACC",
        series=[SeriesSpec(modality="MR", description="T1", number=1, n_instances=1)],
    )
    return build_study(spec)[0]


def test_coercion_sets_the_target_and_keeps_the_previous_values() -> None:
    ds = _cd_dataset()
    birth_before = ds.get("PatientBirthDate")
    target = identity_from_fhir(PATIENT, ORDER, CTX)

    changed = coerce_identity(
        ds, target, modifying_system="fhir-facade", source_of_previous_values="CD", when=WHEN
    )

    assert ds.PatientID == "MRN-42"
    assert ds.IssuerOfPatientID == ""  # the site's own MRN system has no issuer (ADR 0003)
    assert str(ds.PatientName) == "Doe^Jane^Q"
    assert ds.PatientBirthDate == "19700517"
    assert ds.AccessionNumber == "ACC-777"
    assert "PatientSex" not in changed  # already F: not touched, not recorded
    [item] = ds.OriginalAttributesSequence
    assert item.ReasonForTheAttributeModification == "COERCE"
    assert item.ModifyingSystem == "fhir-facade"
    assert item.SourceOfPreviousValues == "CD"
    assert item.AttributeModificationDateTime == "20261205160000.000000+0000"
    [previous] = item.ModifiedAttributesSequence
    assert previous.PatientID == "EXT-1"
    assert previous.IssuerOfPatientID == "OTHER_HOSPITAL"
    assert str(previous.PatientName) == "DOE^J"
    assert previous.AccessionNumber == "EXT-ACC"
    assert "PatientSex" not in previous
    assert set(changed) == {k for k in previous.dir() if k}
    if birth_before is None:
        assert previous.PatientBirthDate == ""  # absent before: recorded as empty


def test_coercion_survives_a_write_and_read_and_a_second_correction_appends() -> None:
    ds = _cd_dataset()
    coerce_identity(ds, identity_from_fhir(PATIENT, None, CTX), modifying_system="fhir-facade", when=WHEN)
    reread = pydicom.dcmread(BytesIO(to_bytes(ds)))

    changed = coerce_identity(
        reread,
        IdentityTarget(patient_id="MRN-43"),
        modifying_system="fhir-facade",
        reason="CORRECT",
        when=WHEN,
    )

    assert changed == ("PatientID",)
    first, second = reread.OriginalAttributesSequence
    assert first.ModifiedAttributesSequence[0].PatientID == "EXT-1"
    assert second.ReasonForTheAttributeModification == "CORRECT"
    assert second.ModifiedAttributesSequence[0].PatientID == "MRN-42"


def test_an_identity_that_already_holds_changes_nothing() -> None:
    ds = _cd_dataset()
    target = IdentityTarget(
        patient_id="EXT-1", issuer_of_patient_id="OTHER_HOSPITAL", accession_number="EXT-ACC"
    )
    before = to_bytes(ds)

    assert coerce_identity(ds, target, modifying_system="fhir-facade") == ()
    assert "OriginalAttributesSequence" not in ds
    assert to_bytes(ds) == before


@pytest.mark.parametrize(
    ("identifier", "expected"),
    [
        ({"system": OWN_SYSTEM, "value": "A1"}, ("A1", "")),
        ({"system": "http://hospital-a.example.org/mrn", "value": "A1"}, ("A1", "HOSP_A")),
        ({"system": "urn:oid:1.2.3.4", "value": "A1"}, ("A1", "1.2.3.4")),
        ({"system": OWN_SYSTEM, "value": "A1", "assigner": {"display": "LOCAL"}}, ("A1", "LOCAL")),
    ],
)
def test_identifier_systems_map_back_to_issuers(identifier: dict, expected: tuple[str, str]) -> None:
    assert identity_from_identifier(identifier, CTX) == expected


@pytest.mark.parametrize(
    ("patient", "expression"),
    [
        ({"resourceType": "Patient"}, "Patient.identifier"),
        (
            {"resourceType": "Patient", "identifier": [{"system": "mrn", "value": "A"}]},
            "Patient.identifier[0].system",
        ),
        (
            {"resourceType": "Patient", "identifier": [{"system": OWN_SYSTEM, "value": "A\\B"}]},
            "Patient.identifier[0].value",
        ),
    ],
)
def test_a_patient_without_a_usable_mrn_is_refused_with_the_element(patient: dict, expression: str) -> None:
    with pytest.raises(IdentityNotDerivable) as caught:
        identity_from_fhir(patient, None, CTX)
    assert caught.value.expression == expression


def test_unknown_gender_empties_sex_and_missing_facts_are_left_alone() -> None:
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": OWN_SYSTEM, "value": "A1"}],
        "gender": "unknown",
    }
    target = identity_from_fhir(patient, None, CTX)
    assert target == IdentityTarget(patient_id="A1", issuer_of_patient_id="", patient_sex="")
