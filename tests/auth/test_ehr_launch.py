"""SMART App Launch 2.x EHR launch with the built-in authorization server (ADR 0042), against the
whole facade (real Orthanc, real HTTP): the built-in EHR launcher sends the browser to the app's
launch_url with ``iss`` and ``launch``, the app asks /auth/authorize with ``launch`` and the ``launch``
scope, the user signs in (no patient choice), and the token carries the launch's patient, whose data
the app can then read -- and nobody else's. Refusals: a launch of another app, an unknown or expired
launch, a launch used by another user, a patient not on the user's list, ``launch`` without its scope.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.patient import Patient
from joserfc import jws

from fhir_facade.auth.server import BuiltinAuthorizationServer, RegistryError
from fhir_facade.auth.server.launches import LAUNCH_LIFETIME, LaunchContexts
from fhir_facade.auth.server.passwords import hash_secret
from fhir_facade.auth.server.registry import load_registry
from fhir_facade.auth.server.shared_state import SharedLaunchContexts
from fhir_facade.config import Settings
from fhir_facade.embedded import EmbeddedOrthanc
from fhir_facade.store import create_store_engine, upgrade
from fhir_facade.store.expiring import ExpiringEntries
from fhir_facade.web_app import IMAGING_APP_CLIENT_ID
from tests.auth.fixtures.smart_app import LoginForm, pkce_pair, sign_in
from tests.conftest import LiveServer, serve

APP, OTHER_APP = "ehr-app", "other-ehr-app"
CALLBACK = "http://127.0.0.1:9000/callback"
LAUNCH_URL = "http://127.0.0.1:9000/launch"
OTHER_LAUNCH_URL = "https://other.example/launch?tenant=7"
ALICE, ALICE_PASSWORD = "alice", "alice ehr launch password"
BOB, BOB_PASSWORD = "bob", "bob ehr launch password"
MINE, NOT_MINE = "P-1001", "P-2002"  # both in the standard corpus


@pytest.fixture(scope="module")
def facade(loaded_orthanc: EmbeddedOrthanc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data_dir = tmp_path_factory.mktemp("ehr-launch")
    clients_file: Path = data_dir / "clients.json"
    app = {
        "kind": "public",
        "redirect_uris": [CALLBACK],
        "scope": "launch launch/patient openid fhirUser patient/*.rs",
    }
    clients_file.write_text(
        json.dumps(
            {
                "clients": [
                    {**app, "client_id": APP, "name": "EHR test app", "launch_url": LAUNCH_URL},
                    {**app, "client_id": OTHER_APP, "launch_url": OTHER_LAUNCH_URL},
                    {**app, "client_id": "no-launch-url"},
                ],
                "users": [
                    {
                        "username": ALICE,
                        "password_hash": hash_secret(ALICE_PASSWORD),
                        "fhirUser": "Practitioner/alice",
                        "patients": [MINE],
                    },
                    {
                        "username": BOB,
                        "password_hash": hash_secret(BOB_PASSWORD),
                        "patients": [MINE, NOT_MINE],
                    },
                ],
            }
        )
    )
    settings = {
        "auth": "smart",
        "dicomweb_url": loaded_orthanc.dicomweb_url,
        "data_dir": data_dir,
        "auth_clients_file": clients_file,
    }
    with serve(settings) as server:
        yield server


@pytest.fixture
def browser(facade: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=root(facade), follow_redirects=False, timeout=30) as client:
        yield client


def root(facade: LiveServer) -> str:
    return facade.base_url.removesuffix("/fhir")


def scripted_launch(
    browser: httpx.Client, *, client_id: str = APP, username: str = ALICE, password: str = ALICE_PASSWORD
) -> httpx.Response:
    """What a scripted EHR does: one POST to the launcher."""
    form = {"username": username, "password": password, "client_id": client_id, "patient": MINE}
    return browser.post("/auth/ehr-launch", data=form)


def launch_value(response: httpx.Response, launch_url: str = LAUNCH_URL) -> dict[str, str]:
    """Assert the launcher's 303 to the app's launch_url; return its query (iss, launch, ...)."""
    assert response.status_code == 303, response.text
    location = response.headers["location"]
    assert location.startswith(launch_url.split("?")[0] + "?"), location
    return {name: values[0] for name, values in parse_qs(urlsplit(location).query).items()}


def authorize_params(facade: LiveServer, launch: str, challenge: str, **overrides: str) -> dict[str, str]:
    params = {
        "response_type": "code",
        "client_id": APP,
        "redirect_uri": CALLBACK,
        "scope": "launch openid fhirUser patient/*.rs",
        "state": uuid.uuid4().hex,
        "aud": facade.base_url,
        "launch": launch,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    params.update(overrides)
    return params


def callback_query(response: httpx.Response, state: str) -> dict[str, str]:
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith(CALLBACK + "?"), location
    query = {name: values[0] for name, values in parse_qs(urlsplit(location).query).items()}
    assert query["state"] == state
    return query


def test_discovery_lists_ehr_launch(browser: httpx.Client) -> None:
    config = browser.get("/fhir/.well-known/smart-configuration").json()
    assert {"launch-ehr", "context-ehr-patient", "launch-standalone"} <= set(config["capabilities"])
    assert "launch" in config["scopes_supported"]


def test_full_ehr_launch_gives_the_launch_patient_and_only_that(
    facade: LiveServer, browser: httpx.Client
) -> None:
    # The EHR: the launcher lists the apps with a launch_url, the user signs in and picks a patient.
    page = browser.get("/auth/ehr-launch")
    assert page.status_code == 200 and page.headers["x-frame-options"] == "DENY"
    launcher = LoginForm(page)
    # ... and the SMART app the facade serves itself, registered whenever /app is on (ADR 0043).
    assert launcher.options["client_id"] == [APP, OTHER_APP, IMAGING_APP_CLIENT_ID]
    choice = launcher.submit(browser, username=ALICE, password=ALICE_PASSWORD, client_id=APP)
    assert choice.status_code == 200, choice.text
    assert LoginForm(choice).options["patient"] == [MINE] and ALICE_PASSWORD not in choice.text
    launched = launch_value(LoginForm(choice).submit(browser, patient=MINE, decision="allow"))
    assert launched["iss"] == facade.base_url

    # The app: authorize with launch and the launch scope; sign-in, no patient choice.
    verifier, challenge = pkce_pair()
    params = authorize_params(facade, launched["launch"], challenge)
    page = browser.get("/auth/authorize", params=params)
    assert page.status_code == 200, page.headers.get("location")
    signed_in = LoginForm(page).submit(browser, username=ALICE, password=ALICE_PASSWORD, decision="allow")
    code = callback_query(signed_in, params["state"])["code"]
    token = browser.post(
        "/auth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": CALLBACK,
            "client_id": APP,
            "code_verifier": verifier,
        },
    )
    assert token.status_code == 200, token.text
    body = token.json()
    assert body["patient"] == MINE and "encounter" not in body
    assert body["scope"].split() == ["patient/*.rs", "launch", "fhirUser"]  # openid is never granted
    # The claims (the FHIR reads below check the signature).
    claims: dict[str, Any] = json.loads(jws.extract_compact(body["access_token"].encode()).payload)
    assert (claims["patient"], claims["fhirUser"], claims["sub"]) == (MINE, "Practitioner/alice", ALICE)

    # The FHIR API: the launch patient's data, nobody else's.
    bearer = {"Authorization": f"Bearer {body['access_token']}"}
    patient = browser.get(f"/fhir/Patient/{MINE}", headers=bearer)
    assert patient.status_code == 200, patient.text
    assert Patient.model_validate(patient.json()).id == MINE
    assert browser.get(f"/fhir/Patient/{NOT_MINE}", headers=bearer).status_code == 404
    studies = Bundle.model_validate(browser.get("/fhir/ImagingStudy", headers=bearer).json())
    found = [entry.resource for entry in studies.entry or []]
    assert found and {study.subject.reference for study in found} == {f"Patient/{MINE}"}  # type: ignore[union-attr]

    # A launch is used once.
    _, challenge = pkce_pair()
    again = authorize_params(facade, launched["launch"], challenge)
    used = callback_query(browser.get("/auth/authorize", params=again), again["state"])
    assert used["error"] == "invalid_request"


def test_scripted_launch_in_one_post_with_encounter(facade: LiveServer, browser: httpx.Client) -> None:
    form = {
        "username": ALICE,
        "password": ALICE_PASSWORD,
        "client_id": OTHER_APP,
        "patient": MINE,
        "encounter": "enc-1",
    }
    launched = launch_value(browser.post("/auth/ehr-launch", data=form), OTHER_LAUNCH_URL)
    assert launched["tenant"] == "7" and launched["iss"] == facade.base_url and launched["launch"]


def test_launch_of_another_app_is_refused(facade: LiveServer, browser: httpx.Client) -> None:
    other = launch_value(scripted_launch(browser, client_id=OTHER_APP), OTHER_LAUNCH_URL)["launch"]
    _, challenge = pkce_pair()
    params = authorize_params(facade, other, challenge)
    query = callback_query(browser.get("/auth/authorize", params=params), params["state"])
    assert query["error"] == "invalid_request" and "launch" in query["error_description"]


def test_unknown_launch_is_refused(facade: LiveServer, browser: httpx.Client) -> None:
    _, challenge = pkce_pair()
    params = authorize_params(facade, "made-up-launch-value", challenge)
    query = callback_query(browser.get("/auth/authorize", params=params), params["state"])
    assert query["error"] == "invalid_request"


def test_launch_without_the_launch_scope_is_refused(facade: LiveServer, browser: httpx.Client) -> None:
    launch = launch_value(scripted_launch(browser))["launch"]
    _, challenge = pkce_pair()
    params = authorize_params(facade, launch, challenge, scope="launch/patient patient/*.rs")
    query = callback_query(browser.get("/auth/authorize", params=params), params["state"])
    assert query["error"] == "invalid_request" and "launch scope" in query["error_description"]


def test_launch_of_one_user_used_by_another_is_access_denied(
    facade: LiveServer, browser: httpx.Client
) -> None:
    launch = launch_value(scripted_launch(browser))["launch"]  # Alice's
    _, challenge = pkce_pair()
    params = authorize_params(facade, launch, challenge)
    response = sign_in(browser, "/auth/authorize", username=BOB, password=BOB_PASSWORD, params=params)
    query = callback_query(response, params["state"])
    assert query["error"] == "access_denied" and "code" not in query, query


def test_launcher_refuses_a_patient_not_on_the_users_list(browser: httpx.Client) -> None:
    form = {"username": ALICE, "password": ALICE_PASSWORD, "client_id": APP, "patient": NOT_MINE}
    response = browser.post("/auth/ehr-launch", data=form)
    assert response.status_code == 400 and "location" not in response.headers
    assert LoginForm(response).options["patient"] == [MINE]


def test_launcher_refuses_an_app_without_launch_url(browser: httpx.Client) -> None:
    response = scripted_launch(browser, client_id="no-launch-url")
    assert response.status_code == 400 and "location" not in response.headers


def test_launcher_wrong_password_is_401(browser: httpx.Client) -> None:
    response = scripted_launch(browser, username=BOB, password="wrong")
    assert response.status_code == 401 and "location" not in response.headers


# --- the launch store on its own: expiry, client binding, sharing between replicas ---------------


@pytest.mark.parametrize("shared", [False, True])
def test_launch_contexts_expire_and_are_bound_to_their_client(shared: bool, tmp_path: Path) -> None:
    now = [1_000_000.0]
    contexts: LaunchContexts
    replica: LaunchContexts
    if shared:
        engine = create_store_engine(f"sqlite:///{tmp_path / 'store.db'}")
        upgrade(engine)
        entries = ExpiringEntries(engine, clock=lambda: datetime.fromtimestamp(now[0], UTC))
        contexts = SharedLaunchContexts(entries, clock=lambda: now[0])
        replica = SharedLaunchContexts(entries, clock=lambda: now[0])
    else:
        contexts = replica = LaunchContexts(clock=lambda: now[0])
    launch = contexts.create(client_id=APP, patient=MINE, username=ALICE, encounter="enc-1")
    assert len(launch) >= 40
    found = replica.find(launch, APP)
    assert found is not None and (found.patient, found.username, found.encounter) == (MINE, ALICE, "enc-1")
    assert replica.find(launch, OTHER_APP) is None
    now[0] += LAUNCH_LIFETIME + 1
    assert replica.find(launch, APP) is None and replica.take(launch, APP) is None
    second = contexts.create(client_id=APP, patient=MINE, username=None)
    assert replica.take(second, APP) is not None and replica.take(second, APP) is None  # once


@pytest.mark.parametrize("url", ["http://app.example/launch", "https://app.example/launch#x", "launch"])
def test_registry_refuses_an_insecure_launch_url(tmp_path: Path, url: str) -> None:
    path = tmp_path / "clients.json"
    client = {"client_id": APP, "kind": "public", "redirect_uris": [CALLBACK], "scope": "launch patient/*.rs"}
    path.write_text(json.dumps({"clients": [{**client, "launch_url": url}], "users": []}))
    with pytest.raises(RegistryError, match="launch_url"):
        load_registry(path)


def test_launch_scope_without_a_launch_grants_neither_it_nor_patient_scopes(
    facade: LiveServer, browser: httpx.Client
) -> None:
    """Standalone: ``launch`` alone gives no patient context, so ``patient/`` scopes are not granted
    and, with nothing else asked for, the request is invalid_scope."""
    _, challenge = pkce_pair()
    params = authorize_params(facade, "", challenge, scope="launch fhirUser patient/*.rs")
    del params["launch"]
    query = callback_query(browser.get("/auth/authorize", params=params), params["state"])
    assert query["error"] == "invalid_scope"


# --- in process (the router in a bare app), with the launch store's clock in the test's hands -----


@pytest.fixture
def in_process(tmp_path: Path) -> Iterator[tuple[TestClient, BuiltinAuthorizationServer, list[float]]]:
    clients_file = tmp_path / "clients.json"
    clients_file.write_text(
        json.dumps(
            {
                "clients": [
                    {
                        "client_id": APP,
                        "kind": "public",
                        "redirect_uris": [CALLBACK],
                        "scope": "launch patient/*.rs",
                        "launch_url": LAUNCH_URL,
                    }
                ],
                "users": [
                    {"username": ALICE, "password_hash": hash_secret(ALICE_PASSWORD), "patients": [MINE]}
                ],
            }
        )
    )
    settings = Settings(
        auth="smart", base_url=IN_PROCESS_BASE, data_dir=tmp_path / "data", auth_clients_file=clients_file
    )
    server = BuiltinAuthorizationServer(settings)
    now = [1_000_000.0]
    server.oauth.launches = LaunchContexts(clock=lambda: now[0])
    app = FastAPI()
    app.include_router(server.router)
    with TestClient(app, base_url=IN_PROCESS_BASE.removesuffix("/fhir"), follow_redirects=False) as client:
        yield client, server, now


IN_PROCESS_BASE = "http://127.0.0.1:8080/fhir"


def _authorize(launch: str, challenge: str) -> dict[str, str]:
    return {
        "response_type": "code",
        "client_id": APP,
        "redirect_uri": CALLBACK,
        "scope": "launch patient/*.rs",
        "state": uuid.uuid4().hex,
        "aud": IN_PROCESS_BASE,
        "launch": launch,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }


def test_expired_launch_is_refused(
    in_process: tuple[TestClient, BuiltinAuthorizationServer, list[float]],
) -> None:
    http, server, now = in_process
    launch = server.oauth.launches.create(client_id=APP, patient=MINE, username=ALICE)
    _, challenge = pkce_pair()
    assert http.get("/auth/authorize", params=_authorize(launch, challenge)).status_code == 200  # live
    now[0] += LAUNCH_LIFETIME + 1
    params = _authorize(launch, challenge)
    query = callback_query(http.get("/auth/authorize", params=params), params["state"])
    assert query["error"] == "invalid_request"


def test_launch_with_an_encounter_puts_it_in_the_token_response(
    in_process: tuple[TestClient, BuiltinAuthorizationServer, list[float]],
) -> None:
    http, server, _ = in_process
    launch = server.oauth.launches.create(client_id=APP, patient=MINE, username=ALICE, encounter="enc-9")
    verifier, challenge = pkce_pair()
    params = _authorize(launch, challenge)
    form = {**params, "username": ALICE, "password": ALICE_PASSWORD}  # one POST, as scripted apps do
    code = callback_query(http.post("/auth/authorize", data=form), params["state"])["code"]
    token = http.post(
        "/auth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": CALLBACK,
            "client_id": APP,
            "code_verifier": verifier,
        },
    ).json()
    assert (token["patient"], token["encounter"], token["scope"]) == (MINE, "enc-9", "patient/*.rs launch")
