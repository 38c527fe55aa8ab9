"""The DICOMweb proxy inside the secured facade: a client follows Endpoint.address with the token it
already has; the token's scopes and patient context apply to QIDO and WADO there too."""

from __future__ import annotations

import httpx

from tests.auth.issuer import TestIssuer
from tests.conftest import LiveServer, ok_json, outcome
from tests.dicom_factory import CORPUS

OWN, OTHER = CORPUS["mueller_mr_brain"], CORPUS["yamada_mr"]
PATIENT_SCOPES = "launch/patient patient/ImagingStudy.rs patient/Endpoint.rs"
DICOM_JSON = {"Accept": "application/dicom+json"}


def _address(client: httpx.Client, issuer: TestIssuer) -> str:
    endpoint = ok_json(
        client.get("Endpoint/dicom-wado-rs", headers=issuer.headers(PATIENT_SCOPES, patient=OWN.patient_id))
    )
    return str(endpoint["address"])


def test_proxy_needs_a_token(client: httpx.Client, issuer: TestIssuer) -> None:
    response = httpx.get(f"{_address(client, issuer)}/studies", headers=DICOM_JSON)
    outcome(response, 401, "login")
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_proxy_confines_qido_and_wado(client: httpx.Client, issuer: TestIssuer, secured: LiveServer) -> None:
    address = _address(client, issuer)
    token = issuer.headers(PATIENT_SCOPES, patient=OWN.patient_id)
    studies = httpx.get(f"{address}/studies", headers={**DICOM_JSON, **token}).json()
    assert studies and {s["00100020"]["Value"][0] for s in studies} == {OWN.patient_id}
    metadata = httpx.get(f"{address}/studies/{OWN.study_uid}/metadata", headers={**DICOM_JSON, **token})
    assert metadata.status_code == 200 and metadata.json()
    outcome(
        httpx.get(f"{address}/studies/{OTHER.study_uid}/metadata", headers={**DICOM_JSON, **token}),
        404,
        "not-found",
    )


def test_proxy_needs_imaging_study_scope(client: httpx.Client, issuer: TestIssuer) -> None:
    address = _address(client, issuer)
    response = httpx.get(
        f"{address}/studies", headers={**DICOM_JSON, **issuer.headers("user/Observation.rs")}
    )
    outcome(response, 403, "forbidden")
    assert 'error="insufficient_scope"' in response.headers["www-authenticate"]


def test_bad_token_on_the_proxy(client: httpx.Client, issuer: TestIssuer) -> None:
    address = _address(client, issuer)
    forged = issuer.mint("user/*.rs", aud="http://elsewhere.example/fhir")
    response = httpx.get(f"{address}/studies", headers={**DICOM_JSON, "Authorization": f"Bearer {forged}"})
    outcome(response, 401, "login")
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
