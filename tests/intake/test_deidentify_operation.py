"""`$deidentify` end to end: a real source Orthanc, a second real Orthanc as the destination
DICOMweb store, the facade between them. The stored result is read back from the destination and
checked against the source: identifying attributes gone, PixelData byte-identical, the same patient
pseudonym for two studies of one patient, burned-in annotation flagged, a Provenance written."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from fhir_facade.embedded import EmbeddedOrthanc, free_port
from tests import dicom_factory
from tests.auth.issuer import TestIssuer
from tests.conftest import LiveServer, ok_json, outcome, serve
from tests.dicom_factory import SeriesSpec, StudySpec

SECRET = "a-test-secret-of-more-than-16-bytes"
FIRST = StudySpec(
    patient_id="DEID-1",
    patient_name="MUSTERMANN^ERIKA",
    birth_date="19700304",
    sex="F",
    accession="ACC-DEID-1",
    study_date="20240110",
    study_time="101500",
    description="Head MUSTERMANN",
    referring_physician="HOUSE^GREGORY",
    series=[SeriesSpec("MR", "T1 axial", 1, n_instances=2)],
)
SECOND = StudySpec(
    patient_id="DEID-1",
    patient_name="MUSTERMANN^ERIKA",
    birth_date="19700304",
    sex="F",
    accession="ACC-DEID-2",
    study_date="20240210",
    series=[SeriesSpec("US", "Abdomen", 1, n_instances=1, sop_class="1.2.840.10008.5.1.4.1.1.6.1")],
)


def _start(path: Path) -> EmbeddedOrthanc:
    return EmbeddedOrthanc(path, http_port=free_port(), dicom_port=free_port(), stable_age=2, http_auth=False)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedOrthanc, EmbeddedOrthanc]]:
    with _start(tmp_path_factory.mktemp("source")) as source, _start(tmp_path_factory.mktemp("dest")) as dest:
        with httpx.Client(timeout=30) as client:
            for spec in (FIRST, SECOND):
                dicom_factory.upload(client, source.url, dicom_factory.build_study(spec))
        yield source, dest


@pytest.fixture(scope="module")
def server(stores: tuple[EmbeddedOrthanc, EmbeddedOrthanc]) -> Iterator[LiveServer]:
    source, dest = stores
    with serve(
        {
            "dicomweb_url": source.dicomweb_url,
            "deidentify_enabled": True,
            "deidentify_secret": SECRET,
            "deidentify_destinations": {"research": dest.dicomweb_url},
        }
    ) as live:
        yield live


@pytest.fixture(scope="module")
def fhir(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


def _parameters(destination: str = "research", *options: str) -> dict[str, Any]:
    return {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "destination", "valueString": destination},
            *({"name": "option", "valueCode": o} for o in options),
        ],
    }


def _instances(orthanc: EmbeddedOrthanc, study_uid: str) -> list[pydicom.Dataset]:
    with httpx.Client(timeout=30) as client:
        found = client.post(
            f"{orthanc.url}/tools/find", json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}
        ).json()
        return [
            pydicom.dcmread(io.BytesIO(client.get(f"{orthanc.url}/instances/{i}/file").content))
            for i in found
        ]


@pytest.fixture(scope="module")
def first_result(fhir: httpx.Client) -> dict[str, Any]:
    response = fhir.post(
        f"/ImagingStudy/{FIRST.study_uid}/$deidentify",
        json=_parameters(
            "research", "retain-modified-dates", "retain-patient-characteristics", "clean-descriptors"
        ),
    )
    return ok_json(response)


def _value(parameters: dict[str, Any], name: str) -> Any:
    found = next(p for p in parameters["parameter"] if p["name"] == name)
    return next(v for k, v in found.items() if k.startswith("value"))


def test_the_destination_holds_a_deidentified_copy(
    first_result: dict[str, Any], stores: tuple[EmbeddedOrthanc, EmbeddedOrthanc]
) -> None:
    source, dest = stores
    new_uid = _value(first_result, "studyInstanceUid").removeprefix("urn:oid:")
    assert new_uid != FIRST.study_uid
    originals = {ds.InstanceNumber: ds for ds in _instances(source, FIRST.study_uid)}
    copies = {ds.InstanceNumber: ds for ds in _instances(dest, new_uid)}
    assert len(copies) == len(originals) == 2
    for number, copy in copies.items():
        original = originals[number]
        assert copy.PixelData == original.PixelData  # byte-identical
        assert copy.SOPInstanceUID != original.SOPInstanceUID
        assert copy.PatientID == _value(first_result, "patientPseudonym") != original.PatientID
        assert "MUSTERMANN" not in str(copy.PatientName)
        assert copy.get("AccessionNumber", "") == ""
        assert "ReferringPhysicianName" not in copy or not copy.ReferringPhysicianName
        assert copy.PatientSex == "F"  # retain patient characteristics
        assert copy.StudyDate != original.StudyDate and len(copy.StudyDate) == 8  # modified dates
        assert "MUSTERMANN" not in copy.get("StudyDescription", "").upper()  # clean descriptors
        assert copy.PatientIdentityRemoved == "YES"
        codes = {item.CodeValue for item in copy.DeidentificationMethodCodeSequence}
        assert codes == {"113100", "113107", "113108", "113105"}


def test_a_provenance_names_the_source_study(fhir: httpx.Client, first_result: dict[str, Any]) -> None:
    reference = _value(first_result, "provenance")["reference"]
    provenance = ok_json(fhir.get(f"/{reference}"))
    assert provenance["entity"][0] == {
        "role": "source",
        "what": {"reference": f"ImagingStudy/{FIRST.study_uid}"},
    }
    assert provenance["activity"]["coding"][0]["code"] == "DEID"
    assert provenance["target"][0]["identifier"]["value"] == _value(first_result, "studyInstanceUid")


def test_one_patient_gets_one_pseudonym_and_ultrasound_is_flagged(
    fhir: httpx.Client, first_result: dict[str, Any]
) -> None:
    second = ok_json(fhir.post(f"/ImagingStudy/{SECOND.study_uid}/$deidentify", json=_parameters()))
    assert _value(second, "patientPseudonym") == _value(first_result, "patientPseudonym")
    instance = next(p for p in second["parameter"] if p["name"] == "instance")
    parts = {p["name"]: p for p in instance["part"]}
    assert parts["burnedInAnnotation"]["valueCode"] == "unknown"
    assert "ultrasound" in parts["warning"]["valueString"]
    again = ok_json(fhir.post(f"/ImagingStudy/{SECOND.study_uid}/$deidentify", json=_parameters()))
    assert _value(again, "studyInstanceUid") == _value(second, "studyInstanceUid")  # keyed, stable


def test_errors(fhir: httpx.Client) -> None:
    outcome(
        fhir.post(f"/ImagingStudy/{FIRST.study_uid}/$deidentify", json=_parameters("http://evil/")),
        400,
        "invalid",
    )
    outcome(
        fhir.post(f"/ImagingStudy/{FIRST.study_uid}/$deidentify", json=_parameters("research", "keep-all")),
        400,
        "invalid",
    )
    outcome(fhir.post("/ImagingStudy/1.2.3.999/$deidentify", json=_parameters()), 404, "not-found")


def test_the_capability_statement_declares_it(fhir: httpx.Client) -> None:
    capability = ok_json(fhir.get("/metadata"))
    study = next(r for r in capability["rest"][0]["resource"] if r["type"] == "ImagingStudy")
    assert any(o["name"] == "deidentify" for o in study.get("operation", []))
    ok_json(fhir.get("/OperationDefinition/deidentify"))


def test_it_needs_its_scope_and_a_user_or_system_grant(
    stores: tuple[EmbeddedOrthanc, EmbeddedOrthanc],
) -> None:
    source, dest = stores
    port = free_port()
    issuer = TestIssuer(audience=f"http://127.0.0.1:{port}/fhir")
    settings = {
        **issuer.facade_settings,
        "dicomweb_url": source.dicomweb_url,
        "deidentify_enabled": True,
        "deidentify_secret": SECRET,
        "deidentify_destinations": {"research": dest.dicomweb_url},
    }
    path = f"/ImagingStudy/{FIRST.study_uid}/$deidentify"
    try:
        server = serve(settings, port=port)
        with server, httpx.Client(base_url=server.base_url, timeout=60) as http:
            assert http.post(path, json=_parameters()).status_code == 401
            without = http.post(
                path, json=_parameters(), headers=issuer.headers("system/ImagingStudy.rs system/Provenance.c")
            )
            outcome(without, 403, "forbidden")
            assert 'scope="deidentify"' in without.headers["www-authenticate"]
            no_provenance = issuer.headers("system/ImagingStudy.rs deidentify")
            outcome(http.post(path, json=_parameters(), headers=no_provenance), 403, "forbidden")
            patient = issuer.headers(
                "launch/patient patient/ImagingStudy.rs patient/Provenance.c deidentify", patient="DEID-1"
            )
            outcome(http.post(path, json=_parameters(), headers=patient), 403, "forbidden")
            allowed = issuer.headers("system/ImagingStudy.rs system/Provenance.cr deidentify")
            ok_json(http.post(path, json=_parameters(), headers=allowed))
    finally:
        issuer.close()
