"""The built-in authorization server on two replicas behind one public URL (ADR 0032): its codes,
sign-in tickets, refresh tokens (ADR 0047), seen assertion `jti`s and lockout counters live in the
shared PostgreSQL store, so a sign-in begun at one replica finishes at the other, a code issued by
replica A is redeemed at B (once), a refresh token rotates across replicas and a replay at either
revokes its family, a private_key_jwt assertion replayed at the other replica is refused, and failures at
either replica count towards one lockout. Both replicas sign with the one key in the shared data
directory, so a token from one is accepted by the other."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from joserfc.jwk import RSAKey

from fhir_facade.auth.server.passwords import hash_secret
from fhir_facade.embedded import EmbeddedOrthanc, free_port
from tests.auth.fixtures.smart_app import ASSERTION_TYPE, LoginForm, client_assertion, pkce_pair
from tests.replicas.conftest import Replica, ReplicaSet

APP = "replica-viewer"
BACKEND = "replica-backend"
CALLBACK = "http://127.0.0.1:9000/callback"
USER, PASSWORD = "dr-replica", "two replicas one server"
FAILURES = 3


@pytest.fixture(scope="module")
def backend_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "replica-backend-1"})


@pytest.fixture(scope="module")
def public_root() -> str:
    """The one public URL of both replicas (a load balancer's; nothing listens there in this test)."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def replicas(
    orthanc: EmbeddedOrthanc,
    module_postgres_url: str,
    backend_key: RSAKey,
    public_root: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ReplicaSet]:
    folder = tmp_path_factory.mktemp("replica-auth")
    registry = folder / "clients.json"
    registry.write_text(
        json.dumps(
            {
                "clients": [
                    {
                        "client_id": APP,
                        "kind": "public",
                        "redirect_uris": [CALLBACK],
                        "scope": "launch/patient openid fhirUser patient/*.rs online_access",
                    },
                    {
                        "client_id": BACKEND,
                        "kind": "backend-service",
                        "scope": "system/ImagingStudy.rs",
                        "jwks": {"keys": [backend_key.as_dict(private=False)]},
                    },
                ],
                "users": [
                    {
                        "username": USER,
                        "password_hash": hash_secret(PASSWORD),
                        "fhirUser": "Practitioner/replica",
                        "patients": ["P-1", "P-2"],
                    }
                ],
            }
        )
    )
    env = {
        "FACADE_DATABASE_URL": module_postgres_url,
        "FACADE_DICOMWEB_URL": orthanc.dicomweb_url,
        "FACADE_AUTH": "smart",
        "FACADE_AUTH_CLIENTS_FILE": str(registry),
        "FACADE_DATA_DIR": str(folder / "data"),  # shared: one signing key
        "FACADE_AUTH_LOCKOUT_FAILURES": str(FAILURES),
        "FACADE_AUTH_LOCKOUT_ADDRESS_FAILURES": "100",
        "FACADE_AUTH_LOCKOUT_DELAY": "0",
        "FACADE_AUTH_LOCKOUT_MAX_DELAY": "0",
        "FACADE_ANALYZE_ENABLED": "false",
        "FACADE_WATCH_STUDIES": "false",
    }
    port = int(urlsplit(public_root).port or 0)
    with ReplicaSet(2, env, folder, public_port=port) as started:
        yield started


def authorization_code(
    browser: httpx.Client,
    start: Replica,
    finish: Replica,
    challenge: str,
    aud: str,
    scope: str = "launch/patient openid fhirUser patient/*.rs",
) -> str:
    """Sign in at `start`, pick the patient at `finish` (the sign-in ticket crosses replicas)."""
    params = {
        "response_type": "code",
        "client_id": APP,
        "redirect_uri": CALLBACK,
        "scope": scope,
        "state": "replicas",
        "aud": aud,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    page = browser.get(f"{start.root}/auth/authorize", params=params)
    assert page.status_code == 200, page.text
    form = LoginForm(page)
    form.action = f"{start.root}/auth/authorize"
    choice_page = form.submit(browser, username=USER, password=PASSWORD, decision="allow")
    assert choice_page.status_code == 200 and 'name="patient"' in choice_page.text, choice_page.text
    choice = LoginForm(choice_page)
    choice.action = f"{finish.root}/auth/authorize"
    redirect = choice.submit(browser, patient="P-1", decision="allow")
    assert redirect.status_code == 302, redirect.text
    query = parse_qs(urlsplit(redirect.headers["location"]).query)
    return query["code"][0]


def redeem(replica: Replica, code: str, verifier: str) -> httpx.Response:
    return httpx.post(
        f"{replica.root}/auth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": CALLBACK,
            "client_id": APP,
            "code_verifier": verifier,
        },
        timeout=30,
    )


def backend_token(replica: Replica, assertion: str) -> httpx.Response:
    return httpx.post(
        f"{replica.root}/auth/token",
        data={
            "grant_type": "client_credentials",
            "scope": "system/ImagingStudy.rs",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
        },
        timeout=30,
    )


def test_a_code_issued_by_one_replica_is_redeemed_once_at_the_other(
    replicas: ReplicaSet, public_root: str
) -> None:
    a, b = replicas[0], replicas[1]
    verifier, challenge = pkce_pair()
    with httpx.Client(timeout=30) as browser:
        code = authorization_code(browser, a, b, challenge, aud=f"{public_root}/fhir")
    redeemed = redeem(b, code, verifier)
    assert redeemed.status_code == 200, redeemed.text
    token = redeemed.json()["access_token"]
    # Signed by B with the shared key: A accepts it.
    answer = httpx.get(f"{a.base_url}/Patient/P-1", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert answer.status_code != 401, answer.text
    again = redeem(a, code, verifier)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant", again.text


def refresh(replica: Replica, token: str) -> httpx.Response:
    return httpx.post(
        f"{replica.root}/auth/token",
        data={"grant_type": "refresh_token", "refresh_token": token, "client_id": APP},
        timeout=30,
    )


def test_refresh_tokens_rotate_across_replicas_and_a_replay_revokes_the_family(
    replicas: ReplicaSet, public_root: str
) -> None:
    a, b = replicas[0], replicas[1]
    verifier, challenge = pkce_pair()
    scope = "launch/patient openid fhirUser patient/*.rs online_access"
    with httpx.Client(timeout=30) as browser:
        code = authorization_code(browser, a, b, challenge, aud=f"{public_root}/fhir", scope=scope)
    first = redeem(a, code, verifier).json()["refresh_token"]
    at_b = refresh(b, first)
    assert at_b.status_code == 200, at_b.text
    second = at_b.json()["refresh_token"]
    at_a = refresh(a, second)
    assert at_a.status_code == 200, at_a.text
    assert at_a.json()["patient"] == "P-1"
    third = at_a.json()["refresh_token"]
    replay = refresh(b, first)
    assert replay.status_code == 400 and "family is revoked" in replay.json()["error_description"]
    newest = refresh(a, third)
    assert newest.status_code == 400 and newest.json()["error"] == "invalid_grant", newest.text

    # Concurrent redemptions of one token at both replicas (PostgreSQL advisory locks): one wins.
    verifier, challenge = pkce_pair()
    with httpx.Client(timeout=30) as browser:
        code = authorization_code(browser, b, a, challenge, aud=f"{public_root}/fhir", scope=scope)
    token = redeem(b, code, verifier).json()["refresh_token"]
    with ThreadPoolExecutor(6) as pool:
        statuses = sorted(pool.map(lambda n: refresh(replicas[n % 2], token).status_code, range(6)))
    # The rest are replays (400), or refused by the lockout's in-flight budget (429, ADR 0011).
    assert statuses[0] == 200 and set(statuses[1:]) <= {400, 429}, statuses


def test_an_assertion_replayed_at_the_other_replica_is_refused(
    replicas: ReplicaSet, backend_key: RSAKey, public_root: str
) -> None:
    a, b = replicas[0], replicas[1]
    assertion = client_assertion(backend_key, BACKEND, f"{public_root}/auth/token")
    first = backend_token(a, assertion)
    assert first.status_code == 200, first.text
    replay = backend_token(b, assertion)
    assert replay.status_code in (400, 401) and replay.json()["error"] == "invalid_client", replay.text
    fresh = backend_token(b, client_assertion(backend_key, BACKEND, f"{public_root}/auth/token"))
    assert fresh.status_code == 200, fresh.text


def test_failures_at_either_replica_count_towards_one_lockout(
    replicas: ReplicaSet, backend_key: RSAKey, public_root: str
) -> None:
    a, b = replicas[0], replicas[1]
    stranger = RSAKey.generate_key(2048, parameters={"kid": "replica-backend-1"})
    token_url = f"{public_root}/auth/token"
    for n in range(FAILURES):  # A, B, A: no replica alone has seen FAILURES failures
        refused = backend_token(replicas[n % 2], client_assertion(stranger, BACKEND, token_url))
        assert refused.status_code in (400, 401), refused.text
    locked = backend_token(b, client_assertion(backend_key, BACKEND, token_url))
    assert locked.status_code == 429, locked.text
    assert int(locked.headers["Retry-After"]) > 0
    assert backend_token(a, client_assertion(backend_key, BACKEND, token_url)).status_code == 429
