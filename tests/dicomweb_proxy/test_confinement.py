"""The confinement rules: pure functions first, then what they do for patient ids that Orthanc's
QIDO cannot match as written (spaces, commas, wildcards, non-ASCII)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from fhir_facade.dicom_to_fhir.patient import patient_resource_id
from fhir_facade.dicomweb_proxy.confinement import (
    PatientKey,
    asked_patient,
    confined_query,
    names_patient,
    qido_pattern,
)
from fhir_facade.embedded import EmbeddedOrthanc, store_instances
from tests.dicomweb_proxy.conftest import caller, new_study


@pytest.mark.parametrize(
    "name",
    ["PatientID", "patientid", "00100020", "0010,0020", "(0010,0020)", "IssuerOfPatientID", "00100021"],
)
def test_every_spelling_of_the_patient_keys_is_recognised(name: str) -> None:
    assert names_patient(name)


@pytest.mark.parametrize(
    "name", ["PatientName", "00100010", "OtherPatientIDsSequence", "StudyInstanceUID", ""]
)
def test_other_keys_are_not_patient_keys(name: str) -> None:
    assert not names_patient(name)


def test_confined_query_replaces_patient_keys_and_keeps_the_rest_verbatim() -> None:
    key = PatientKey("P-1", "HOSP A")
    raw = "PatientID=X&PatientName=M%C3%BC*&Patient%49D=Y&0010,0021=Z&limit=5&includefield=00081030&"
    assert confined_query(raw, key) == (
        "PatientName=M%C3%BC*&limit=5&includefield=00081030"
        "&PatientID=P-1&IssuerOfPatientID=HOSP?A&includefield=00100020&includefield=00100021"
    )
    assert (
        confined_query("", PatientKey("P-1")) == "PatientID=P-1&includefield=00100020&includefield=00100021"
    )


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        ("P-1001", "P-1001"),
        ("SP ACE", "SP?ACE"),
        ("CO,MA", "CO?MA"),
        ("ST*AR", "ST?AR"),
        ("Ünïcode", "*n*code"),
    ],
)
def test_qido_pattern(value: str, pattern: str) -> None:
    assert qido_pattern(value) == pattern


def test_patient_key_matching() -> None:
    key = PatientKey("P-1")
    assert key.matches("P-1 ", None) and key.matches("P-1", "")
    assert not key.matches("P-1", "HOSP") and not key.matches("P-10", None)
    assert PatientKey("P-1", "HOSP").matches("P-1", "HOSP ")
    with pytest.raises(ValueError, match="patient_id"):
        PatientKey("")


@pytest.mark.parametrize(
    ("own", "lookalike"),
    [("ODD ID,1", "ODD-ID-1"), ("ST*R", "STAR"), ("Ünï-7", "Xnï-7")],
)
def test_patient_with_an_odd_id_sees_exactly_its_studies(
    scratch_orthanc: EmbeddedOrthanc,
    scratch_proxy: httpx.Client,
    scratch_direct: httpx.Client,
    own: str,
    lookalike: str,
) -> None:
    own_study, other_study = new_study(own), new_study(lookalike)
    for ds in [*own_study, *other_study]:
        ds.SpecificCharacterSet = "ISO_IR 192"
    with httpx.Client(timeout=30) as client:
        store_instances(client, scratch_orthanc.url, [*own_study, *other_study])
    patient = patient_resource_id(own, None)
    assert patient is not None
    # Orthanc finds nothing for this PatientID percent-encoded, as a client library would send it.
    assert scratch_direct.get("/studies", params={"PatientID": own}).json() == []
    response = scratch_proxy.get("/studies", headers=caller("patient/ImagingStudy.rs", patient))
    assert response.status_code == 200
    assert [ds["0020000D"]["Value"][0] for ds in response.json()] == [str(own_study[0].StudyInstanceUID)]
    assert [ds["00100020"]["Value"][0] for ds in response.json()] == [own]
    series = scratch_proxy.get("/series", headers=caller("patient/ImagingStudy.rs", patient)).json()
    assert {ds["0020000D"]["Value"][0] for ds in series} == {str(own_study[0].StudyInstanceUID)}


def test_the_clients_own_patient_key_still_narrows_a_confined_search() -> None:
    """With several reachable patients each is searched; the client's PatientID (and issuer) then
    keeps only the one it asked for (PS3.4 C.2.2.2: wildcards, empty = all, last repeat counts)."""

    def ds(patient_id: str, issuer: str | None = None) -> dict[str, Any]:
        found: dict[str, Any] = {"00100020": {"vr": "LO", "Value": [patient_id]}}
        if issuer is not None:
            found["00100021"] = {"vr": "LO", "Value": [issuer]}
        return found

    a, b, a_hosp = ds("DEMO-0001"), ds("VIEWER-B"), ds("DEMO-0001", "HOSP A")
    only_a = asked_patient("limit=101&00100020=DEMO-0001&includefield=00081030")
    assert only_a(a) and only_a(a_hosp) and not only_a(b)
    assert asked_patient("PatientID=*-B")(b) and not asked_patient("PatientID=*-B")(a)
    assert asked_patient("PatientID=DEMO-000?")(a) and not asked_patient("PatientID=DEMO-00?")(a)
    assert all(asked_patient(query)(b) for query in ("", "PatientID=", "limit=5", "StudyDate=2024"))
    assert asked_patient("PatientID=X&Patient%49D=VIEWER-B")(b)  # the last repeat counts
    with_issuer = asked_patient("PatientID=DEMO-0001&0010,0021=HOSP%20A")
    assert with_issuer(a_hosp) and not with_issuer(a)
    assert asked_patient("PatientID=DEMO.0001")(a) is False  # "." is no wildcard
    assert asked_patient("PatientID=X,VIEWER-B")(b) and asked_patient("PatientID=X%2CVIEWER-B")(b)
