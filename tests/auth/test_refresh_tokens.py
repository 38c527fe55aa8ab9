"""Refresh tokens of the built-in authorization server (SMART App Launch 2.x ``online_access`` /
``offline_access``, RFC 6749 6, RFC 9700 4.14; ADR 0047), against the whole facade (real Orthanc,
real HTTP, SQLite store): the PKCE flow through the sign-in pages gives a refresh token only with
``online_access``; a refresh gives an access token the FHIR API accepts and rotates the refresh
token; a used one fails and revokes its family; scopes only narrow; the token is bound to its
client; only its SHA-256 is stored; a second replica on the same database redeems it. Lifetimes,
the lockout and revocation run against the server in process (no Orthanc needed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from fhir.resources.R4B.patient import Patient
from joserfc import jws
from joserfc.jwk import RSAKey

from fhir_facade.app import create_app
from fhir_facade.auth.server import BuiltinAuthorizationServer
from fhir_facade.auth.server.passwords import hash_secret
from fhir_facade.auth.server.scope_grants import covers
from fhir_facade.config import Settings
from fhir_facade.embedded import EmbeddedOrthanc, free_port
from tests.auth.fixtures.smart_app import ASSERTION_TYPE, client_assertion, pkce_pair, sign_in
from tests.conftest import LiveServer, validate

APP, OTHER_APP, PLAIN_APP, OFFLINE_APP = "refresh-app", "other-app", "plain-app", "offline-app"
AUDITOR = "refresh-auditor"
CALLBACK = "http://127.0.0.1:9000/callback"
USER, PASSWORD = "dr-refresh", "a refresh token password"
PATIENT = "P-1001"  # in the standard corpus
APP_SCOPE = "launch/patient fhirUser patient/*.rs online_access"


def registry(auditor_key: RSAKey | None = None) -> dict[str, Any]:
    app = {"kind": "public", "redirect_uris": [CALLBACK]}
    auditor = {
        "client_id": AUDITOR,
        "kind": "backend-service",
        "scope": "system/AuditEvent.rs",
        "jwks": {"keys": [auditor_key.as_dict(private=False)]} if auditor_key else {},
    }
    return {
        "clients": [
            *([auditor] if auditor_key else []),
            {**app, "client_id": APP, "scope": APP_SCOPE},
            {**app, "client_id": OTHER_APP, "scope": APP_SCOPE},
            {**app, "client_id": PLAIN_APP, "scope": "launch/patient fhirUser patient/*.rs"},
            {**app, "client_id": OFFLINE_APP, "scope": f"{APP_SCOPE} offline_access"},
        ],
        "users": [
            {
                "username": USER,
                "password_hash": hash_secret(PASSWORD),
                "fhirUser": "Practitioner/refresh",
                "patients": [PATIENT],
            }
        ],
    }


@pytest.fixture(scope="module")
def auditor_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "refresh-auditor-1"})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, auditor_key: RSAKey) -> Path:
    folder = tmp_path_factory.mktemp("refresh-tokens")
    (folder / "clients.json").write_text(json.dumps(registry(auditor_key)))
    return folder


@pytest.fixture(scope="module")
def database(data_dir: Path) -> Path:
    return data_dir / "store.sqlite3"


def facade_settings(orthanc: EmbeddedOrthanc, data_dir: Path, database: Path, port: int) -> Settings:
    """One replica's settings: all replicas share the public URL, the data directory (one signing
    key) and the store database (ADR 0032)."""
    return Settings(
        auth="smart",
        base_url=f"http://127.0.0.1:{port}/fhir",
        dicomweb_url=orthanc.dicomweb_url,
        data_dir=data_dir,
        auth_clients_file=data_dir / "clients.json",
        database_url=f"sqlite:///{database}",
        watch_studies=False,
        analyze_enabled=False,
        auth_lockout_delay=0,
        auth_lockout_max_delay=0,
        auth_lockout_address_failures=100,  # the refusals tested here all come from one address
    )


@pytest.fixture(scope="module")
def facade(loaded_orthanc: EmbeddedOrthanc, data_dir: Path, database: Path) -> Iterator[LiveServer]:
    port = free_port()
    with LiveServer(create_app(facade_settings(loaded_orthanc, data_dir, database, port)), port) as server:
        yield server


@pytest.fixture(scope="module")
def replica(
    facade: LiveServer, loaded_orthanc: EmbeddedOrthanc, data_dir: Path, database: Path
) -> Iterator[LiveServer]:
    """A second facade process's twin: another port, the same public URL, data and database."""
    app = create_app(facade_settings(loaded_orthanc, data_dir, database, facade.port))
    with LiveServer(app, free_port()) as server:
        yield server


def root_of(server: LiveServer) -> str:
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture
def browser(facade: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=root_of(facade), follow_redirects=False, timeout=30) as client:
        yield client


def signed_in_tokens(
    browser: httpx.Client, aud: str, *, client_id: str = APP, scope: str = APP_SCOPE
) -> dict[str, Any]:
    """The standalone launch through the sign-in pages, and the code exchange (PKCE S256)."""
    verifier, challenge = pkce_pair()
    state = uuid.uuid4().hex
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": CALLBACK,
        "scope": scope,
        "state": state,
        "aud": aud,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    redirect = sign_in(browser, "/auth/authorize", username=USER, password=PASSWORD, params=params)
    assert redirect.status_code == 302, redirect.text
    query = parse_qs(urlsplit(redirect.headers["location"]).query)
    assert query["state"] == [state]
    token = browser.post(
        "/auth/token",
        data={
            "grant_type": "authorization_code",
            "code": query["code"][0],
            "redirect_uri": CALLBACK,
            "client_id": client_id,
            "code_verifier": verifier,
        },
    )
    assert token.status_code == 200, token.text
    body: dict[str, Any] = token.json()
    return body


def refresh(
    http: httpx.Client | TestClient, token: str, client_id: str = APP, **extra: str
) -> httpx.Response:
    return http.post(
        "/auth/token",
        data={"grant_type": "refresh_token", "refresh_token": token, "client_id": client_id, **extra},
    )


def oauth_error(response: httpx.Response, status: int, error: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["error"] == error, body
    return str(body.get("error_description", ""))


def claims(access_token: str) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(jws.extract_compact(access_token.encode()).payload)
    return payload


# --- through the whole facade ----------------------------------------------------------------


def test_discovery_offers_refresh(browser: httpx.Client) -> None:
    config = browser.get("/fhir/.well-known/smart-configuration").json()
    assert {"permission-online", "permission-offline"} <= set(config["capabilities"])
    assert {"online_access", "offline_access"} <= set(config["scopes_supported"])
    assert "refresh_token" in config["grant_types_supported"]


def test_refresh_token_only_with_online_access(facade: LiveServer, browser: httpx.Client) -> None:
    without = signed_in_tokens(browser, facade.base_url, scope="launch/patient fhirUser patient/*.rs")
    assert "refresh_token" not in without and "online_access" not in without["scope"].split()
    # Asked for, but the client is not registered for it: not granted, no refresh token.
    plain = signed_in_tokens(browser, facade.base_url, client_id=PLAIN_APP)
    assert "refresh_token" not in plain and "online_access" not in plain["scope"].split()
    # Not registered for offline_access: asking for it gets online_access only.
    online = signed_in_tokens(browser, facade.base_url, scope=f"{APP_SCOPE} offline_access")
    assert online["refresh_token"] and online["scope"].split()[-1] == "online_access"
    assert "offline_access" not in online["scope"].split()
    offline = signed_in_tokens(
        browser, facade.base_url, client_id=OFFLINE_APP, scope=f"{APP_SCOPE} offline_access"
    )
    assert offline["refresh_token"] and "offline_access" in offline["scope"].split()


def test_refresh_rotates_and_the_new_access_token_reads_fhir(
    facade: LiveServer, browser: httpx.Client
) -> None:
    first = signed_in_tokens(browser, facade.base_url)
    assert first["patient"] == PATIENT and first["refresh_token"]

    renewed = refresh(browser, first["refresh_token"])
    assert renewed.status_code == 200, renewed.text
    assert renewed.headers["cache-control"] == "no-store"
    body = renewed.json()
    assert body["refresh_token"] and body["refresh_token"] != first["refresh_token"]
    assert body["access_token"] != first["access_token"]
    assert body["scope"] == first["scope"] and body["patient"] == PATIENT
    assert body["token_type"] == "Bearer" and body["expires_in"] == 300
    old, new = claims(first["access_token"]), claims(body["access_token"])
    assert (new["sub"], new["client_id"], new["patient"], new["fhirUser"]) == (
        USER,
        APP,
        PATIENT,
        "Practitioner/refresh",
    )
    assert new["jti"] != old["jti"]

    read = browser.get(
        f"/fhir/Patient/{PATIENT}", headers={"Authorization": f"Bearer {body['access_token']}"}
    )
    assert read.status_code == 200, read.text
    assert Patient.model_validate(read.json()).id == PATIENT
    other = browser.get("/fhir/Patient/P-2002", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert other.status_code == 404  # still confined to the launch patient


def test_reuse_of_a_rotated_token_revokes_the_family(facade: LiveServer, browser: httpx.Client) -> None:
    first = signed_in_tokens(browser, facade.base_url)["refresh_token"]
    second = refresh(browser, first).json()["refresh_token"]
    third = refresh(browser, second).json()["refresh_token"]

    assert "already used" in oauth_error(refresh(browser, first), 400, "invalid_grant")
    # The newest token of the family is dead too: a thief and the app cannot both go on.
    assert "revoked" in oauth_error(refresh(browser, third), 400, "invalid_grant")
    # Another sign-in starts a new family that is not affected.
    fresh = signed_in_tokens(browser, facade.base_url)["refresh_token"]
    assert refresh(browser, fresh).status_code == 200


def test_scope_may_narrow_but_not_widen(facade: LiveServer, browser: httpx.Client) -> None:
    token = signed_in_tokens(browser, facade.base_url)["refresh_token"]
    for wider in ("patient/*.cruds", "user/*.rs", "patient/*.rs launch"):
        oauth_error(refresh(browser, token, scope=wider), 400, "invalid_scope")
    # The refused attempts did not use the token up.
    narrowed = refresh(browser, token, scope="patient/Observation.r launch/patient online_access")
    assert narrowed.status_code == 200, narrowed.text
    body = narrowed.json()
    assert body["scope"] == "patient/Observation.r launch/patient online_access"
    assert claims(body["access_token"])["scope"] == body["scope"]
    bearer = {"Authorization": f"Bearer {body['access_token']}"}
    assert browser.get(f"/fhir/Patient/{PATIENT}", headers=bearer).status_code == 403
    # The successor keeps the original grant: a later refresh may ask for all of it again.
    again = refresh(browser, body["refresh_token"], scope=APP_SCOPE)
    assert again.status_code == 200 and again.json()["scope"] == APP_SCOPE


def test_another_client_cannot_use_it(facade: LiveServer, browser: httpx.Client) -> None:
    token = signed_in_tokens(browser, facade.base_url)["refresh_token"]
    assert "another client" in oauth_error(refresh(browser, token, client_id=OTHER_APP), 400, "invalid_grant")
    oauth_error(refresh(browser, token, client_id=PLAIN_APP), 400, "unauthorized_client")
    oauth_error(refresh(browser, token, client_id="nobody"), 400, "invalid_client")
    assert refresh(browser, token).status_code == 200  # its own client still can


def test_unknown_and_missing_tokens_are_refused(browser: httpx.Client) -> None:
    oauth_error(refresh(browser, "not-a-token"), 400, "invalid_grant")
    missing = browser.post("/auth/token", data={"grant_type": "refresh_token", "client_id": APP})
    oauth_error(missing, 400, "invalid_request")


def test_only_the_digest_is_stored(facade: LiveServer, browser: httpx.Client, database: Path) -> None:
    token = signed_in_tokens(browser, facade.base_url)["refresh_token"]
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT kind, key, value FROM expiring_entry").fetchall()
    assert all(token not in f"{key} {value}" for _, key, value in rows)
    keys = {key for kind, key, _ in rows if kind == "refresh-token"}
    assert hashlib.sha256(token.encode()).hexdigest() in keys


def test_a_second_replica_redeems_and_detects_reuse(
    facade: LiveServer, replica: LiveServer, browser: httpx.Client
) -> None:
    token = signed_in_tokens(browser, facade.base_url)["refresh_token"]
    with httpx.Client(base_url=root_of(replica), timeout=30) as other:
        at_replica = refresh(other, token)
        assert at_replica.status_code == 200, at_replica.text
        body = at_replica.json()
        # The replica's access token is one the first process accepts (one key, one public URL).
        bearer = {"Authorization": f"Bearer {body['access_token']}"}
        assert browser.get(f"/fhir/Patient/{PATIENT}", headers=bearer).status_code == 200
        # Its successor works back at the first process; the used one fails at either.
        successor = refresh(browser, body["refresh_token"])
        assert successor.status_code == 200, successor.text
        oauth_error(refresh(other, token), 400, "invalid_grant")
        oauth_error(refresh(browser, successor.json()["refresh_token"]), 400, "invalid_grant")


def test_concurrent_redemptions_one_wins(
    facade: LiveServer, replica: LiveServer, browser: httpx.Client
) -> None:
    token = signed_in_tokens(browser, facade.base_url)["refresh_token"]
    roots = [root_of(facade), root_of(replica)] * 3

    def redeem(root: str) -> int:
        with httpx.Client(base_url=root, timeout=30) as http:
            return refresh(http, token).status_code

    with ThreadPoolExecutor(len(roots)) as pool:
        statuses = sorted(pool.map(redeem, roots))
    assert statuses == [200] + [400] * (len(roots) - 1)


def test_a_replay_is_logged_and_audited(
    facade: LiveServer, browser: httpx.Client, auditor_key: RSAKey, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fhir_facade.auth.server")
    first = signed_in_tokens(browser, facade.base_url)["refresh_token"]
    assert refresh(browser, first).status_code == 200
    oauth_error(refresh(browser, first), 400, "invalid_grant")

    lines = [record.getMessage() for record in caplog.records]
    assert any("already used: its family is revoked" in line and f"'{APP}'" in line for line in lines)
    assert not any(first in line for line in lines)
    issued = browser.post(
        "/auth/token",
        data={
            "grant_type": "client_credentials",
            "scope": "system/AuditEvent.rs",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": client_assertion(auditor_key, AUDITOR, f"{root_of(facade)}/auth/token"),
        },
    )
    assert issued.status_code == 200, issued.text
    bearer = {"Authorization": f"Bearer {issued.json()['access_token']}"}
    deadline = time.monotonic() + 10
    found: list[dict[str, Any]] = []
    while not found and time.monotonic() < deadline:
        bundle = browser.get("/fhir/AuditEvent", params={"_count": "500"}, headers=bearer).json()
        found = [
            entry["resource"]
            for entry in bundle.get("entry", [])
            if "its family is revoked" in entry["resource"].get("outcomeDesc", "")
        ]
        time.sleep(0.1)
    assert found, "no AuditEvent for the replayed refresh token"
    event = found[-1]
    validate(event)
    assert event["type"]["code"] == "110114" and event["outcome"] == "4"
    assert event["agent"][0]["who"]["identifier"]["value"] == APP
    assert first not in json.dumps(event)


# --- in process: lifetimes, lockout, revocation ----------------------------------------------

ROOT = "http://127.0.0.1:8000"
BASE = f"{ROOT}/fhir"


def in_process(tmp_path: Path, **overrides: Any) -> TestClient:
    (tmp_path / "clients.json").write_text(json.dumps(registry()))
    settings = Settings(
        auth="smart",
        base_url=BASE,
        data_dir=tmp_path / "data",
        auth_clients_file=tmp_path / "clients.json",
        **overrides,
    )
    app = FastAPI()
    app.include_router(BuiltinAuthorizationServer(settings).router)
    return TestClient(app, base_url=ROOT, follow_redirects=False)


def test_family_lifetime_is_absolute(tmp_path: Path) -> None:
    with in_process(tmp_path, auth_refresh_token_lifetime=3) as http:
        token = signed_in_tokens(http, BASE)["refresh_token"]  # type: ignore[arg-type]
        successor = refresh(http, token)
        assert successor.status_code == 200, successor.text
        time.sleep(3.2)  # refreshing did not extend the family
        oauth_error(refresh(http, successor.json()["refresh_token"]), 400, "invalid_grant")


def test_offline_access_gets_the_offline_lifetime(tmp_path: Path) -> None:
    with in_process(tmp_path, auth_refresh_token_lifetime=1, auth_offline_refresh_token_lifetime=60) as http:
        offline = signed_in_tokens(http, BASE, client_id=OFFLINE_APP, scope=f"{APP_SCOPE} offline_access")  # type: ignore[arg-type]
        online = signed_in_tokens(http, BASE)  # type: ignore[arg-type]
        time.sleep(1.2)
        oauth_error(refresh(http, online["refresh_token"]), 400, "invalid_grant")
        assert refresh(http, offline["refresh_token"], client_id=OFFLINE_APP).status_code == 200


def test_failed_refreshes_count_towards_the_lockout(tmp_path: Path) -> None:
    overrides = {"auth_lockout_address_failures": 3, "auth_lockout_delay": 0, "auth_lockout_max_delay": 0}
    with in_process(tmp_path, **overrides) as http:
        token = signed_in_tokens(http, BASE)["refresh_token"]  # type: ignore[arg-type]
        for _ in range(3):
            oauth_error(refresh(http, "guessed-" + uuid.uuid4().hex), 400, "invalid_grant")
        locked = refresh(http, token)
        assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0


def revoke(http: httpx.Client | TestClient, token: str, client_id: str = APP) -> httpx.Response:
    return http.post(
        "/auth/revoke", data={"token": token, "token_type_hint": "refresh_token", "client_id": client_id}
    )


def test_sign_out_revokes_the_family(facade: LiveServer, browser: httpx.Client) -> None:
    config = browser.get("/fhir/.well-known/smart-configuration").json()
    assert config["revocation_endpoint"] == f"{root_of(facade)}/auth/revoke"
    first = signed_in_tokens(browser, facade.base_url)["refresh_token"]
    current = refresh(browser, first).json()["refresh_token"]
    # Another client cannot revoke it (and is not told: RFC 7009 2.2).
    assert revoke(browser, current, client_id=OTHER_APP).status_code == 200
    assert refresh(browser, current).status_code == 200
    # The app's sign-out: revoking its current refresh token ends the family.
    family = signed_in_tokens(browser, facade.base_url)["refresh_token"]
    newest = refresh(browser, family).json()["refresh_token"]
    answer = revoke(browser, newest)
    assert answer.status_code == 200 and answer.json() == {}
    assert "revoked" in oauth_error(refresh(browser, newest), 400, "invalid_grant")
    # Unknown tokens and access tokens: 200, nothing to do.
    assert revoke(browser, "not-a-token").status_code == 200
    oauth_error(browser.post("/auth/revoke", data={"client_id": APP}), 400, "invalid_request")


@pytest.mark.parametrize(
    ("requested", "inside"),
    [
        ("patient/*.rs launch/patient online_access", True),
        ("patient/Observation.r", True),
        ("patient/Observation.read", True),  # v1 spelling of rs
        ("patient/Observation.rs?category=laboratory", True),  # a query narrows
        ("patient/*.cruds", False),
        ("patient/*.write", False),
        ("user/Observation.r", False),
        ("system/*.rs", False),
        ("patient/*.rs offline_access", False),
        ("patient/*.rs launch", False),
    ],
)
def test_refresh_scope_covers(requested: str, inside: bool) -> None:
    assert covers("patient/*.rs launch/patient fhirUser online_access", requested) is inside
