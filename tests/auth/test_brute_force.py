"""Brute-force protection of the built-in authorization server (ADR 0011), over real HTTP against the
whole facade (FACADE_AUTH=smart, built-in server, auditing on by default): the sign-in form and the
token endpoint lock out repeated failures per username / client_id and, independently, per client
address, answer 429 with Retry-After, and log and audit every refusal.

Client addresses: the facade runs under uvicorn, which takes the client address from
X-Forwarded-For when the connection comes from a trusted proxy (127.0.0.1 by default), so each test
plays a different client by sending that header. Every test uses its own users and addresses, so
the module's one facade can be shared."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from joserfc.jwk import RSAKey

from fhir_facade.auth.server.passwords import hash_secret
from tests.auth.fixtures.smart_app import ASSERTION_TYPE, LoginForm, client_assertion, pkce_pair
from tests.conftest import LiveServer, serve, validate

APP = "lockout-app"
CALLBACK = "http://127.0.0.1:9000/callback"
BACKEND = "lockout-backend"
AUDITOR = "lockout-auditor"
PASSWORD = "the right password"
USERS = ("alice", "bob", "carol", "dave", "erin", "frank", "grace")
FAILURES = 5
ADDRESS_FAILURES = 8


@pytest.fixture(scope="module")
def backend_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "lockout-backend-1"})


def registry(key: RSAKey) -> dict[str, Any]:
    password_hash = hash_secret(PASSWORD)
    return {
        "clients": [
            {
                "client_id": APP,
                "kind": "public",
                "redirect_uris": [CALLBACK],
                "scope": "openid fhirUser user/*.rs",
            },
            *(
                {
                    "client_id": client_id,
                    "kind": "backend-service",
                    "scope": "system/AuditEvent.rs",
                    "jwks": {"keys": [key.as_dict(private=False)]},
                }
                for client_id in (BACKEND, AUDITOR)
            ),
        ],
        "users": [{"username": name, "password_hash": password_hash} for name in USERS],
    }


def facade(data_dir: Path, key: RSAKey, **settings: Any) -> LiveServer:
    clients_file = data_dir / "clients.json"
    clients_file.write_text(json.dumps(registry(key)))
    return serve(
        {
            "auth": "smart",
            "data_dir": data_dir,
            "auth_clients_file": clients_file,
            "auth_lockout_failures": FAILURES,
            "auth_lockout_address_failures": ADDRESS_FAILURES,
            "auth_lockout_delay": 0.01,
            "auth_lockout_max_delay": 0.05,
            **settings,
        }
    )


@pytest.fixture(scope="module")
def smart_facade(tmp_path_factory: pytest.TempPathFactory, backend_key: RSAKey) -> Iterator[LiveServer]:
    with facade(tmp_path_factory.mktemp("lockout"), backend_key) as server:
        assert server.app.state.settings.audits
        yield server


def root(server: LiveServer) -> str:
    return server.base_url.removesuffix("/fhir")


class Browser:
    """A user at one client address, with the sign-in form of one authorization request."""

    def __init__(self, server: LiveServer, address: str) -> None:
        self.http = httpx.Client(follow_redirects=False, timeout=30, headers={"X-Forwarded-For": address})
        _, challenge = pkce_pair()
        params = {
            "response_type": "code",
            "client_id": APP,
            "redirect_uri": CALLBACK,
            "scope": "openid fhirUser user/*.rs",
            "state": "lockout-test",
            "aud": server.base_url,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        page = self.http.get(f"{root(server)}/auth/authorize", params=params)
        assert page.status_code == 200, page.text
        self.form = LoginForm(page)

    def sign_in(self, username: str, password: str) -> httpx.Response:
        return self.form.submit(self.http, username=username, password=password, decision="allow")

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def browser(smart_facade: LiveServer) -> Iterator[Any]:
    opened: list[Browser] = []

    def open_at(address: str, server: LiveServer = smart_facade) -> Browser:
        opened.append(Browser(server, address))
        return opened[-1]

    yield open_at
    for each in opened:
        each.close()


def signed_in(response: httpx.Response) -> None:
    assert response.status_code == 302, response.text
    assert response.headers["location"].startswith(CALLBACK + "?code="), response.headers["location"]


def wrong_password(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert "Unknown username or wrong password." in response.text


def locked_out(response: httpx.Response, longest: int = 300) -> int:
    """Assert the 429 sign-in page; return its Retry-After."""
    assert response.status_code == 429, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["cache-control"] == "no-store"
    assert "Too many failed sign-in attempts" in response.text
    assert 'name="password"' not in response.text
    retry_after = int(response.headers["retry-after"])
    assert 0 < retry_after <= longest
    return retry_after


def fail(browser: Browser, username: str, times: int = FAILURES) -> None:
    for _ in range(times):
        wrong_password(browser.sign_in(username, "guess"))


# --- sign-in form ----------------------------------------------------------------------------


def test_repeated_wrong_passwords_lock_the_user_out(browser: Any) -> None:
    attacker = browser("203.0.113.1")
    fail(attacker, "alice")

    refused_right = attacker.sign_in("alice", PASSWORD)
    refused_wrong = attacker.sign_in("alice", "guess")
    locked_out(refused_right)
    locked_out(refused_wrong)
    # The answer is the same whether the password was right: it was not checked.
    assert refused_right.text == refused_wrong.text
    # Counted per user: the right password from another address is refused too...
    locked_out(browser("198.51.100.1").sign_in("alice", PASSWORD))
    # ...while another user at the attacker's address (5 failures there, below 8) still signs in.
    signed_in(attacker.sign_in("bob", PASSWORD))


def test_an_address_is_locked_out_across_usernames(browser: Any) -> None:
    sprayer = browser("203.0.113.2")
    for index in range(ADDRESS_FAILURES):
        wrong_password(sprayer.sign_in(f"nobody-{index}", "guess"))  # one failure per username

    locked_out(sprayer.sign_in("carol", PASSWORD))
    # carol's own counter is clean: from another address she signs in.
    signed_in(browser("198.51.100.2").sign_in("carol", PASSWORD))


def test_parallel_guesses_get_no_more_tries_than_serial_ones(browser: Any) -> None:
    burst = browser("203.0.113.3")
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda _: burst.sign_in("dave", "guess").status_code, range(40)))

    assert answers.count(401) <= FAILURES, answers
    assert set(answers) <= {401, 429}, answers
    locked_out(browser("198.51.100.3").sign_in("dave", PASSWORD))


def test_a_success_resets_the_users_counter(browser: Any) -> None:
    user = browser("203.0.113.4")
    fail(user, "frank", 3)
    signed_in(user.sign_in("frank", PASSWORD))
    fail(user, "frank", 3)  # a fresh budget: without the reset, the third would be 429
    signed_in(user.sign_in("frank", PASSWORD))
    # ...and the fresh budget is a whole one, no more (from another address, whose count is clean).
    elsewhere = browser("198.51.100.4")
    fail(elsewhere, "frank")
    locked_out(elsewhere.sign_in("frank", PASSWORD))


def test_the_lockout_ends_after_its_duration(tmp_path: Path, backend_key: RSAKey, browser: Any) -> None:
    with facade(tmp_path, backend_key, auth_lockout_duration=2) as short:
        user = browser("203.0.113.5", short)
        fail(user, "grace")
        assert locked_out(user.sign_in("grace", PASSWORD), longest=2) in (1, 2)

        time.sleep(2.2)

        signed_in(user.sign_in("grace", PASSWORD))


# --- token endpoint --------------------------------------------------------------------------


def token_request(server: LiveServer, assertion: str, address: str | None = None) -> httpx.Response:
    return httpx.post(
        f"{root(server)}/auth/token",
        data={
            "grant_type": "client_credentials",
            "scope": "system/AuditEvent.rs",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
        },
        headers={"X-Forwarded-For": address} if address else {},
        timeout=30,
    )


def test_bad_client_assertions_lock_the_client_out(smart_facade: LiveServer, backend_key: RSAKey) -> None:
    token_url = f"{root(smart_facade)}/auth/token"
    impostor = RSAKey.generate_key(2048, parameters={"kid": backend_key.kid})
    for _ in range(FAILURES):
        refused = token_request(smart_facade, client_assertion(impostor, BACKEND, token_url), "203.0.113.6")
        assert refused.status_code == 400 and refused.json()["error"] == "invalid_client", refused.text

    genuine = token_request(smart_facade, client_assertion(backend_key, BACKEND, token_url), "198.51.100.6")

    assert genuine.status_code == 429, genuine.text
    assert genuine.headers["content-type"].startswith("application/json")
    assert genuine.headers["cache-control"] == "no-store"
    assert 0 < int(genuine.headers["retry-after"]) <= 300
    body = genuine.json()
    assert body["error"] == "invalid_client"
    assert "retry after" in body["error_description"]
    # Another client is not affected.
    other = token_request(smart_facade, client_assertion(backend_key, AUDITOR, token_url), "198.51.100.6")
    assert other.status_code == 200, other.text


def test_unknown_clients_lock_the_address_out(smart_facade: LiveServer, backend_key: RSAKey) -> None:
    token_url = f"{root(smart_facade)}/auth/token"
    for index in range(ADDRESS_FAILURES):
        stranger = client_assertion(backend_key, f"stranger-{index}", token_url)
        assert token_request(smart_facade, stranger, "203.0.113.7").status_code == 400

    refused = token_request(smart_facade, client_assertion(backend_key, AUDITOR, token_url), "203.0.113.7")
    assert refused.status_code == 429 and refused.json()["error"] == "invalid_client", refused.text
    assert int(refused.headers["retry-after"]) > 0


# --- log and audit ---------------------------------------------------------------------------


def auth_events(server: LiveServer, key: RSAKey, description: str) -> list[dict[str, Any]]:
    """The User Authentication AuditEvents whose outcomeDesc contains `description`, read over the
    FHIR API with a backend token (waiting for the recorder's queue)."""
    token_url = f"{root(server)}/auth/token"
    issued = token_request(server, client_assertion(key, AUDITOR, token_url))
    assert issued.status_code == 200, issued.text
    headers = {"Authorization": f"Bearer {issued.json()['access_token']}"}
    deadline = time.monotonic() + 10
    while True:
        bundle = httpx.get(
            f"{server.base_url}/AuditEvent", params={"_count": "500"}, headers=headers, timeout=30
        ).json()
        found = [
            entry["resource"]
            for entry in bundle.get("entry", [])
            if entry["resource"]["type"]["code"] == "110114"
            and description in entry["resource"].get("outcomeDesc", "")
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_failures_and_lockouts_are_logged_and_audited(
    smart_facade: LiveServer, backend_key: RSAKey, browser: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fhir_facade.auth.server")
    user = browser("203.0.113.8")
    for _ in range(FAILURES):
        wrong_password(user.sign_in("erin", "secret-guess-xyz"))
    locked_out(user.sign_in("erin", PASSWORD))

    lines = [record.getMessage() for record in caplog.records]
    assert any("user 'erin' locked out for 300 s" in line and "203.0.113.8" in line for line in lines), lines
    assert any("refused without checking credentials" in line and "'erin'" in line for line in lines)
    assert not any("secret-guess-xyz" in line or PASSWORD in line for line in lines)

    (lockout,) = auth_events(smart_facade, backend_key, "user 'erin' locked out for 300 s")
    validate(lockout)
    assert lockout["subtype"] == [
        {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110122", "display": "Login"}
    ]
    assert (lockout["action"], lockout["outcome"]) == ("E", "4")
    person, app = lockout["agent"]
    assert person["who"]["identifier"]["value"] == "erin" and person["requestor"] is True
    assert person["network"]["address"] == "203.0.113.8"
    assert app["who"]["identifier"]["value"] == APP
    failures = auth_events(smart_facade, backend_key, "sign-in failed for user 'erin'")
    assert len(failures) == FAILURES
    (refusal,) = auth_events(smart_facade, backend_key, "user 'erin' from 203.0.113.8 is locked out")
    validate(refusal)
    assert "secret-guess-xyz" not in json.dumps([*failures, refusal])


def test_token_endpoint_lockouts_are_audited(smart_facade: LiveServer, backend_key: RSAKey) -> None:
    token_url = f"{root(smart_facade)}/auth/token"
    for _ in range(FAILURES):
        expired = client_assertion(backend_key, "ghost-client", token_url, lifetime=-120)
        assert token_request(smart_facade, expired, "203.0.113.9").status_code == 400

    (event,) = auth_events(smart_facade, backend_key, "client 'ghost-client' locked out")
    validate(event)
    assert event["subtype"][0]["code"] == "ITI-71"
    client, server = event["agent"]
    assert client["who"]["identifier"] == {
        "system": "urn:ietf:params:oauth:client-id",
        "value": "ghost-client",
    }
    assert client["network"]["address"] == "203.0.113.9"
    assert server["who"]["identifier"]["value"] == f"{root(smart_facade)}/auth"
    assert urlsplit(server["who"]["identifier"]["value"]).path == "/auth"
