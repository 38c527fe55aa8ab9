"""The real `fhirclient` library (SMART's Python client) against the whole facade with FACADE_AUTH=smart
and the built-in authorization server: discovery from the CapabilityStatement, SMART Backend Services
and a standalone launch with PKCE, then reads through its own R4 models with the token it got."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fhirclient import client
from fhirclient.models.imagingstudy import ImagingStudy
from fhirclient.server import FHIRUnauthorizedException
from joserfc.jwk import RSAKey

from fhir_facade.auth.server.passwords import hash_secret
from fhir_facade.embedded import EmbeddedOrthanc
from tests.auth.fixtures.smart_app import client_assertion, sign_in
from tests.conftest import LiveServer, serve
from tests.dicom_factory import CORPUS

APP = "fhirclient-app"
BACKEND = "fhirclient-backend"
CALLBACK = "http://127.0.0.1:9000/callback"
USER, PASSWORD = "radiologist", "fhirclient flows password"
STUDY = CORPUS["mueller_mr_brain"]


@pytest.fixture(scope="module")
def backend_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "fhirclient-backend-1"})


@pytest.fixture(scope="module")
def smart_facade(
    loaded_orthanc: EmbeddedOrthanc, tmp_path_factory: pytest.TempPathFactory, backend_key: RSAKey
) -> Iterator[LiveServer]:
    data_dir = tmp_path_factory.mktemp("smart-facade")
    clients_file: Path = data_dir / "clients.json"
    clients_file.write_text(
        json.dumps(
            {
                "clients": [
                    {
                        "client_id": APP,
                        "name": "fhirclient test app",
                        "kind": "public",
                        "redirect_uris": [CALLBACK],
                        "scope": "launch/patient openid fhirUser patient/*.rs user/*.rs",
                    },
                    {
                        "client_id": BACKEND,
                        "kind": "backend-service",
                        "scope": "system/ImagingStudy.rs system/Patient.rs",
                        "jwks": {"keys": [backend_key.as_dict(private=False)]},
                    },
                ],
                "users": [
                    {
                        "username": USER,
                        "password_hash": hash_secret(PASSWORD),
                        "fhirUser": "Practitioner/radiologist",
                        "patients": [STUDY.patient_id],
                    }
                ],
            }
        )
    )
    with serve(
        {
            "auth": "smart",
            "dicomweb_url": loaded_orthanc.dicomweb_url,
            "data_dir": data_dir,
            "auth_clients_file": clients_file,
        }
    ) as server:
        yield server


def root(facade: LiveServer) -> str:
    return facade.base_url.removesuffix("/fhir")


def test_fhirclient_needs_a_token(smart_facade: LiveServer) -> None:
    smart = client.FHIRClient(settings={"app_id": APP, "api_base": smart_facade.base_url})
    # The CapabilityStatement is public and names the authorization server: not ready without a token.
    assert smart.prepare() is False
    assert smart.server.auth.state["authorize_uri"] == f"{root(smart_facade)}/auth/authorize"
    assert smart.server.auth.state["token_uri"] == f"{root(smart_facade)}/auth/token"
    with pytest.raises(FHIRUnauthorizedException):
        ImagingStudy.read(STUDY.study_uid, smart.server)


def test_backend_services_flow(smart_facade: LiveServer, backend_key: RSAKey) -> None:
    token_url = f"{root(smart_facade)}/auth/token"
    # fhirclient sends a pre-signed assertion (settings["jwt_token"]); it does not sign one itself.
    smart = client.FHIRClient(
        settings={
            "app_id": BACKEND,
            "api_base": smart_facade.base_url,
            "jwt_token": client_assertion(backend_key, BACKEND, token_url),
            "scope": "system/ImagingStudy.rs system/Patient.rs",
        }
    )
    assert smart.prepare() is False
    assert smart.server.auth.state["token_uri"] == token_url

    smart.authorize()

    assert smart.ready
    # fhirclient adds launch/patient to every request (wants_patient); a backend service never gets it.
    assert smart.launch_context["scope"] == "system/ImagingStudy.rs system/Patient.rs"
    assert smart.patient_id is None
    study = ImagingStudy.read(STUDY.study_uid, smart.server)
    assert study.id == STUDY.study_uid
    assert study.subject.reference == f"Patient/{STUDY.patient_id}"


def test_standalone_launch_with_pkce(smart_facade: LiveServer) -> None:
    smart = client.FHIRClient(
        settings={
            "app_id": APP,
            "api_base": smart_facade.base_url,
            "redirect_uri": CALLBACK,
            "scope": "openid fhirUser patient/*.rs",
        }
    )
    assert smart.prepare() is False
    authorize_url = smart.authorize_url
    sent = parse_qs(urlsplit(authorize_url).query)
    assert sent["code_challenge_method"] == ["S256"] and sent["aud"] == [smart_facade.base_url]
    assert sent["scope"] == ["launch/patient openid fhirUser patient/*.rs"]

    with httpx.Client(follow_redirects=False, timeout=30) as browser:
        response = sign_in(browser, authorize_url, username=USER, password=PASSWORD, patient=STUDY.patient_id)
    assert response.status_code == 302, response.text
    assert response.headers["location"].startswith(CALLBACK + "?")

    smart.handle_callback(response.headers["location"])

    assert smart.ready
    assert smart.patient_id == STUDY.patient_id
    assert smart.launch_context["scope"] == "patient/*.rs launch/patient fhirUser"
    study = ImagingStudy.read(STUDY.study_uid, smart.server)
    assert study.id == STUDY.study_uid
    assert smart.patient is not None and smart.patient.name[0].family == "Müller"
    # patient/ scopes confine searches to the patient in context
    found = list(ImagingStudy.where({}).perform_resources_iter(smart.server))
    assert found and {s.subject.reference for s in found} == {f"Patient/{STUDY.patient_id}"}
