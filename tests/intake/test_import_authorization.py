"""Who may import (ADR 0009, ADR 0038): create on ImagingStudy; a caller confined to patients imports
only for a Patient of its own, which it must name."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from fhir_facade.embedded import EmbeddedOrthanc, free_port
from tests import dicom_factory
from tests.auth.issuer import TestIssuer
from tests.conftest import LiveServer, ok_json, outcome, serve
from tests.intake.conftest import valid_ct_study

DICOM = {"Content-Type": "application/dicom"}


@pytest.fixture(scope="module")
def port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def issuer(port: int) -> Iterator[TestIssuer]:
    test_issuer = TestIssuer(audience=f"http://127.0.0.1:{port}/fhir")
    yield test_issuer
    test_issuer.close()


@pytest.fixture(scope="module")
def secured(pacs: EmbeddedOrthanc, issuer: TestIssuer, port: int) -> Iterator[LiveServer]:
    with serve(
        {**issuer.facade_settings, "dicomweb_url": pacs.dicomweb_url, "orthanc_url": pacs.url}, port=port
    ) as server:
        yield server


@pytest.fixture(scope="module")
def patients(secured: LiveServer, issuer: TestIssuer) -> tuple[str, str]:
    """Two EHR Patients, written with a system token: (own, other)."""
    system = secured.app.state.settings.patient_identifier_system
    ids = []
    with httpx.Client(base_url=secured.base_url, timeout=30) as http:
        for mrn in ("MRN-OWN", "MRN-OTHER"):
            created = http.post(
                "Patient",
                json={"resourceType": "Patient", "identifier": [{"system": system, "value": mrn}]},
                headers=issuer.headers("system/*.cruds"),
            )
            ids.append(ok_json(created, 201)["id"])
    return ids[0], ids[1]


def _post(secured: LiveServer, headers: dict[str, str], **params: str) -> httpx.Response:
    body = dicom_factory.to_bytes(valid_ct_study("AUTH-SRC", n_instances=1)[0])
    with httpx.Client(base_url=secured.base_url, timeout=60) as http:
        return http.post("ImagingStudy/$import", params=params, content=body, headers={**DICOM, **headers})


def test_a_confined_caller_cannot_import_for_another_patient(
    secured: LiveServer, issuer: TestIssuer, patients: tuple[str, str]
) -> None:
    own, other = patients
    token = issuer.headers("launch/patient patient/*.cruds", patient=own)
    outcome(_post(secured, token, patient=f"Patient/{other}"), 404, "not-found")
    outcome(_post(secured, token), 403, "forbidden")  # must name the patient
    result = ok_json(_post(secured, token, patient=f"Patient/{own}"))
    statuses = [p for p in result["parameter"] if p["name"] == "instance"]
    assert {"name": "status", "valueCode": "stored-with-warnings"} in statuses[0]["part"]


def test_import_needs_create_on_imaging_study(secured: LiveServer, issuer: TestIssuer) -> None:
    outcome(_post(secured, issuer.headers("system/ImagingStudy.rs")), 403, "forbidden")
    outcome(_post(secured, {}), 401, "login")
