"""The built-in authorization server over HTTP (its router in a bare FastAPI app): SMART Backend
Services, authorization code with PKCE and standalone patient launch, and the registry file.

Every token it issues is checked by the resource server's own validator against /auth/jwks."""

from __future__ import annotations

import json
import logging
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from joserfc.jwk import ECKey, RSAKey

from fhir_facade.auth.scopes import InvalidScope
from fhir_facade.auth.server import BuiltinAuthorizationServer, RegistryError, register_backend_client
from fhir_facade.auth.server.codes import CODE_LIFETIME, AuthorizationCode, CodeStore
from fhir_facade.auth.server.passwords import hash_secret, verify_secret
from fhir_facade.auth.server.registry import (
    DEMO_CLIENT_ID,
    DEMO_FHIR_USER,
    DEMO_PATIENTS,
    DEMO_REDIRECT_URIS,
    DEMO_SCOPE,
    DEMO_USERNAME,
    load_registry,
)
from fhir_facade.auth.server.scope_grants import narrow_scopes
from fhir_facade.auth.server.users import ResourceOwner
from fhir_facade.auth.tokens import JwksCache, TokenClaims, TokenValidator
from fhir_facade.config import Settings
from tests.auth.fixtures.smart_app import (
    ASSERTION_TYPE,
    LoginForm,
    client_assertion,
    pkce_pair,
    sign_in,
    unsigned_jwt,
)
from tests.loopback import RecordingServer, json_answer

ROOT = "http://127.0.0.1:8080"
BASE = f"{ROOT}/fhir"
TOKEN_URL = f"{ROOT}/auth/token"
AUTHORIZE_URL = f"{ROOT}/auth/authorize"
CALLBACK = "http://127.0.0.1:9000/callback"
OTHER_CALLBACK = "http://localhost:9000/callback"

APP = "viewer-app"
CONFIDENTIAL = "report-app"
CONFIDENTIAL_SECRET = "report-app-secret-1"
BACKEND = "nightly-export"
USER, PASSWORD = "dr-who", "correct horse battery"
LONELY_USER, LONELY_PASSWORD = "nurse", "no patients here"


@pytest.fixture(scope="module")
def rsa_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "backend-rsa"})


@pytest.fixture(scope="module")
def ec_key() -> ECKey:
    return ECKey.generate_key("P-384", parameters={"kid": "backend-ec"})


@pytest.fixture(scope="module")
def password_hashes() -> dict[str, str]:
    # scrypt is deliberately slow: hash once per module.
    return {
        USER: hash_secret(PASSWORD),
        LONELY_USER: hash_secret(LONELY_PASSWORD),
        CONFIDENTIAL: hash_secret(CONFIDENTIAL_SECRET),
    }


def registry_document(rsa_key: RSAKey, ec_key: ECKey, hashes: dict[str, str]) -> dict[str, Any]:
    return {
        "clients": [
            {
                "client_id": APP,
                "name": "Image Viewer",
                "kind": "public",
                "redirect_uris": [CALLBACK, OTHER_CALLBACK],
                "scope": "launch/patient openid fhirUser patient/*.rs user/*.rs",
            },
            {
                "client_id": CONFIDENTIAL,
                "kind": "confidential",
                "client_secret_hash": hashes[CONFIDENTIAL],
                "redirect_uris": ["https://reports.example/cb"],
                "scope": "launch/patient patient/*.rs",
            },
            {
                "client_id": BACKEND,
                "kind": "backend-service",
                "scope": "system/ImagingStudy.rs system/Patient.rs",
                "jwks": {"keys": [rsa_key.as_dict(private=False), ec_key.as_dict(private=False)]},
            },
        ],
        "users": [
            {
                "username": USER,
                "password_hash": hashes[USER],
                "fhirUser": "Practitioner/who",
                "patients": ["P-1001", "P-2002"],
            },
            {"username": LONELY_USER, "password_hash": hashes[LONELY_USER], "patients": []},
        ],
    }


@pytest.fixture
def registry_file(tmp_path: Path, rsa_key: RSAKey, ec_key: ECKey, password_hashes: dict[str, str]) -> Path:
    path = tmp_path / "clients.json"
    path.write_text(json.dumps(registry_document(rsa_key, ec_key, password_hashes)))
    return path


@pytest.fixture
def settings(tmp_path: Path, registry_file: Path) -> Settings:
    return Settings(auth="smart", base_url=BASE, data_dir=tmp_path / "data", auth_clients_file=registry_file)


@pytest.fixture
def server(settings: Settings) -> BuiltinAuthorizationServer:
    return BuiltinAuthorizationServer(settings)


@pytest.fixture
def http(server: BuiltinAuthorizationServer) -> Iterator[TestClient]:
    app = FastAPI()
    app.include_router(server.router)
    with TestClient(app, base_url=ROOT, follow_redirects=False) as client:
        yield client


@pytest.fixture
def validator(http: TestClient, server: BuiltinAuthorizationServer, settings: Settings) -> TokenValidator:
    return TokenValidator(
        issuer=settings.token_issuer,
        audience=settings.token_audience,
        keys=JwksCache(server.jwks_url, http=http),
    )


def oauth_error(response: httpx.Response, status: int, error: str) -> str:
    """Assert an RFC 6749 5.2 error response; return its description."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["error"] == error, body
    return str(body.get("error_description", ""))


# --- SMART Backend Services ------------------------------------------------------------------


def backend_token(http: TestClient, assertion: str, scope: str = "system/ImagingStudy.rs") -> httpx.Response:
    return http.post(
        "/auth/token",
        data={
            "grant_type": "client_credentials",
            "scope": scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
        },
    )


@pytest.mark.parametrize("key_name", ["rsa_key", "ec_key"])
def test_backend_services_token_validates_at_the_resource_server(
    http: TestClient, validator: TokenValidator, request: pytest.FixtureRequest, key_name: str
) -> None:
    key = request.getfixturevalue(key_name)
    response = backend_token(
        http, client_assertion(key, BACKEND, TOKEN_URL), "system/ImagingStudy.rs system/Patient.rs"
    )

    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 300
    assert body["scope"] == "system/ImagingStudy.rs system/Patient.rs"
    assert "refresh_token" not in body and "patient" not in body
    claims = validator.validate(body["access_token"])
    assert (claims.client_id, claims.subject) == (BACKEND, BACKEND)
    assert claims.scope == body["scope"]
    assert claims.patient is None and claims.fhir_user is None
    assert claims.raw["iss"] == f"{ROOT}/auth" and claims.raw["aud"] == BASE
    assert claims.expires_at - claims.raw["iat"] == 300
    assert claims.raw["jti"]


def test_token_lifetime_follows_the_settings(tmp_path: Path, registry_file: Path, rsa_key: RSAKey) -> None:
    settings = Settings(
        auth="smart",
        base_url=BASE,
        data_dir=tmp_path,
        auth_clients_file=registry_file,
        auth_token_lifetime=60,
    )
    app = FastAPI()
    app.include_router(BuiltinAuthorizationServer(settings).router)
    with TestClient(app, base_url=ROOT) as http:
        body = backend_token(http, client_assertion(rsa_key, BACKEND, TOKEN_URL)).json()
        claims = TokenValidator(
            issuer=settings.token_issuer, audience=BASE, keys=JwksCache(f"{ROOT}/auth/jwks", http=http)
        ).validate(body["access_token"])
    assert body["expires_in"] == 60
    assert claims.expires_at - claims.raw["iat"] == 60


def test_backend_client_keys_from_a_jwks_url(tmp_path: Path, ec_key: ECKey) -> None:
    served: dict[str, Any] = {"status": 200, "body": {"keys": [ec_key.as_dict(private=False)]}}
    jwks_server = RecordingServer(lambda method, path, body: json_answer(served["body"], served["status"]))
    with jwks_server:
        path = tmp_path / "clients.json"
        jwks_url = f"{jwks_server.url}/jwks"
        path.write_text(
            json.dumps(
                {"clients": [{"client_id": "remote-keys", "kind": "backend-service", "scope": "system/*.rs",
                              "jwks_url": jwks_url}]}
            )
        )  # fmt: skip
        settings = Settings(auth="smart", base_url=BASE, data_dir=tmp_path, auth_clients_file=path)
        app = FastAPI()
        app.include_router(BuiltinAuthorizationServer(settings).router)
        with TestClient(app, base_url=ROOT) as http:
            ok = backend_token(http, client_assertion(ec_key, "remote-keys", TOKEN_URL))
            assert ok.status_code == 200, ok.text
            served["status"] = 500
            failed = backend_token(http, client_assertion(ec_key, "remote-keys", TOKEN_URL))
            assert "jwks_url" in oauth_error(failed, 400, "invalid_client")


def test_jwks_serves_only_the_public_key(http: TestClient, server: BuiltinAuthorizationServer) -> None:
    keys = http.get("/auth/jwks").json()["keys"]
    assert len(keys) == 1
    assert keys[0]["kid"] == server.signing_key.kid and keys[0]["alg"] == "ES256"
    assert "d" not in keys[0]
    assert server.public_key_set().as_dict()["keys"] == keys


def test_replayed_assertion_is_refused(http: TestClient, rsa_key: RSAKey) -> None:
    assertion = client_assertion(rsa_key, BACKEND, TOKEN_URL)
    assert backend_token(http, assertion).status_code == 200
    description = oauth_error(backend_token(http, assertion), 400, "invalid_client")
    assert "jti" in description


def test_same_jti_in_a_new_assertion_is_refused(http: TestClient, rsa_key: RSAKey) -> None:
    jti = uuid.uuid4().hex
    assert backend_token(http, client_assertion(rsa_key, BACKEND, TOKEN_URL, jti=jti)).status_code == 200
    response = backend_token(http, client_assertion(rsa_key, BACKEND, TOKEN_URL, jti=jti, lifetime=200))
    assert "jti" in oauth_error(response, 400, "invalid_client")


def test_assertion_living_more_than_five_minutes_is_refused(http: TestClient, rsa_key: RSAKey) -> None:
    response = backend_token(http, client_assertion(rsa_key, BACKEND, TOKEN_URL, lifetime=600))
    assert "exp" in oauth_error(response, 400, "invalid_client")


def test_expired_assertion_is_refused(http: TestClient, rsa_key: RSAKey) -> None:
    response = backend_token(http, client_assertion(rsa_key, BACKEND, TOKEN_URL, lifetime=-120))
    assert "expired" in oauth_error(response, 400, "invalid_client")


@pytest.mark.parametrize("aud", [BASE, "https://other.example/auth/token", f"{TOKEN_URL}/"])
def test_assertion_for_another_audience_is_refused(http: TestClient, rsa_key: RSAKey, aud: str) -> None:
    response = backend_token(http, client_assertion(rsa_key, BACKEND, aud))
    assert TOKEN_URL in oauth_error(response, 400, "invalid_client")


def test_unsigned_assertion_is_refused(http: TestClient) -> None:
    now = int(time.time())
    claims = {"iss": BACKEND, "sub": BACKEND, "aud": TOKEN_URL, "exp": now + 60, "jti": uuid.uuid4().hex}
    response = backend_token(http, unsigned_jwt({"alg": "none", "typ": "JWT"}, claims))
    assert "alg" in oauth_error(response, 400, "invalid_client")


def test_hmac_assertion_keyed_with_the_public_key_is_refused(http: TestClient, rsa_key: RSAKey) -> None:
    # The algorithm-confusion forgery: HS256 with the client's public key as the shared secret.
    import hashlib
    import hmac

    now = int(time.time())
    claims = {"iss": BACKEND, "sub": BACKEND, "aud": TOKEN_URL, "exp": now + 60, "jti": uuid.uuid4().hex}
    header = {"alg": "HS256", "kid": rsa_key.kid, "typ": "JWT"}
    signing_input = unsigned_jwt(header, claims).rsplit(".", 1)[0]
    secret = json.dumps(rsa_key.as_dict(private=False)).encode()
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    response = backend_token(http, unsigned_jwt(header, claims, signature))
    assert "HS256" in oauth_error(response, 400, "invalid_client")


def test_rs256_assertion_is_refused(http: TestClient, rsa_key: RSAKey) -> None:
    response = backend_token(http, client_assertion(rsa_key, BACKEND, TOKEN_URL, algorithm="RS256"))
    assert "RS384" in oauth_error(response, 400, "invalid_client")


def test_assertion_signed_with_an_unregistered_key_is_refused(http: TestClient) -> None:
    impostor = RSAKey.generate_key(2048, parameters={"kid": "backend-rsa"})  # same kid, other key
    response = backend_token(http, client_assertion(impostor, BACKEND, TOKEN_URL))
    assert "signature" in oauth_error(response, 400, "invalid_client")


def test_unknown_backend_client_is_refused(http: TestClient, rsa_key: RSAKey) -> None:
    response = backend_token(http, client_assertion(rsa_key, "stranger", TOKEN_URL))
    assert "does not exist" in oauth_error(response, 400, "invalid_client")


def test_assertion_whose_iss_is_not_its_sub_is_refused(http: TestClient, rsa_key: RSAKey) -> None:
    response = backend_token(http, client_assertion(rsa_key, BACKEND, TOKEN_URL, iss="someone-else"))
    assert "iss" in oauth_error(response, 400, "invalid_client")


def test_backend_scopes_are_narrowed_to_the_registration(
    http: TestClient, rsa_key: RSAKey, validator: TokenValidator
) -> None:
    requested = "launch/patient system/*.read system/Observation.cruds patient/*.rs openid"
    response = backend_token(http, client_assertion(rsa_key, BACKEND, TOKEN_URL), requested)
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "system/ImagingStudy.rs system/Patient.rs"
    claims = validator.validate(response.json()["access_token"])
    assert claims.scope == "system/ImagingStudy.rs system/Patient.rs"


def test_backend_asking_only_for_unregistered_scopes_gets_invalid_scope(
    http: TestClient, rsa_key: RSAKey
) -> None:
    response = backend_token(http, client_assertion(rsa_key, BACKEND, TOKEN_URL), "system/Observation.rs")
    assert BACKEND in oauth_error(response, 400, "invalid_scope")


@pytest.mark.parametrize("scope", ["system/ImagingStudy.rr", "system/imagingstudy.rs", ""])
def test_malformed_or_missing_scope_is_invalid_scope(http: TestClient, rsa_key: RSAKey, scope: str) -> None:
    response = backend_token(http, client_assertion(rsa_key, BACKEND, TOKEN_URL), scope)
    oauth_error(response, 400, "invalid_scope")


def test_public_app_cannot_use_client_credentials(http: TestClient) -> None:
    response = http.post("/auth/token", data={"grant_type": "client_credentials", "client_id": APP})
    oauth_error(response, 400, "invalid_client")


def test_unsupported_grant_type(http: TestClient) -> None:
    data = {"grant_type": "password", "username": USER, "password": PASSWORD}
    response = http.post("/auth/token", data=data)
    oauth_error(response, 400, "unsupported_grant_type")


def test_repeated_parameter_is_invalid_request(http: TestClient, rsa_key: RSAKey) -> None:
    assertion = client_assertion(rsa_key, BACKEND, TOKEN_URL)
    body = (
        f"grant_type=client_credentials&scope=system/Patient.rs&scope=system/ImagingStudy.rs"
        f"&client_assertion_type={ASSERTION_TYPE}&client_assertion={assertion}"
    )
    response = http.post(
        "/auth/token", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert "scope" in oauth_error(response, 400, "invalid_request")


# --- Authorization code + PKCE (standalone launch) -------------------------------------------


def authorize_params(challenge: str, **overrides: str | None) -> dict[str, str]:
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": APP,
        "redirect_uri": CALLBACK,
        "scope": "launch/patient openid fhirUser patient/*.rs",
        "state": uuid.uuid4().hex,
        "aud": BASE,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    params.update(overrides)
    return {name: value for name, value in params.items() if value is not None}


def redirect_query(response: httpx.Response, redirect_uri: str = CALLBACK) -> dict[str, str]:
    """Assert a 302 to the app's redirect URI; return its query."""
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith(redirect_uri + "?"), location
    return {name: values[0] for name, values in parse_qs(urlsplit(location).query).items()}


def authorization_code(http: TestClient, params: dict[str, str], *, patient: str | None = "P-2002") -> str:
    response = sign_in(http, AUTHORIZE_URL, username=USER, password=PASSWORD, patient=patient, params=params)
    query = redirect_query(response, params["redirect_uri"])
    assert query["state"] == params["state"]
    return query["code"]


def exchange(http: TestClient, code: str, verifier: str, **overrides: str) -> httpx.Response:
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": CALLBACK,
        "client_id": APP,
        "code_verifier": verifier,
    }
    data.update(overrides)
    return http.post("/auth/token", data=data)


def test_standalone_launch_gives_the_chosen_patient(http: TestClient, validator: TokenValidator) -> None:
    verifier, challenge = pkce_pair()
    params = authorize_params(challenge)

    page = http.get("/auth/authorize", params=params)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
    assert "Image Viewer" in page.text and 'name="password"' in page.text
    choice = LoginForm(page).submit(http, username=USER, password=PASSWORD, decision="allow")
    assert choice.status_code == 200
    assert LoginForm(choice).options["patient"] == ["P-1001", "P-2002"]
    assert PASSWORD not in choice.text
    query = redirect_query(LoginForm(choice).submit(http, patient="P-2002", decision="allow"))
    assert query["state"] == params["state"]

    response = exchange(http, query["code"], verifier)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["patient"] == "P-2002"
    assert body["token_type"] == "Bearer" and body["expires_in"] == 300
    # openid is never granted (no id_token); the rest is within the registration.
    assert body["scope"] == "patient/*.rs launch/patient fhirUser"
    claims: TokenClaims = validator.validate(body["access_token"])
    assert claims.patient == "P-2002"
    assert claims.fhir_user == "Practitioner/who"
    assert (claims.subject, claims.client_id) == (USER, APP)
    assert claims.scope == body["scope"]


def test_without_launch_patient_there_is_no_patient_step_and_no_patient_scope(
    http: TestClient, validator: TokenValidator
) -> None:
    verifier, challenge = pkce_pair()
    params = authorize_params(challenge, scope="patient/*.rs user/ImagingStudy.rs")
    code = authorization_code(http, params, patient=None)
    body = exchange(http, code, verifier).json()
    assert body["scope"] == "user/ImagingStudy.rs"
    assert "patient" not in body
    claims = validator.validate(body["access_token"])
    assert claims.patient is None and claims.fhir_user is None  # fhirUser was not asked for


def test_one_post_with_credentials_and_patient_is_enough(http: TestClient) -> None:
    verifier, challenge = pkce_pair()
    params = authorize_params(challenge)
    form = {**params, "username": USER, "password": PASSWORD, "patient": "P-1001"}
    query = redirect_query(http.post("/auth/authorize", data=form))
    assert exchange(http, query["code"], verifier).json()["patient"] == "P-1001"


def test_wrong_code_verifier_is_invalid_grant(http: TestClient) -> None:
    _, challenge = pkce_pair()
    other_verifier, _ = pkce_pair()
    code = authorization_code(http, authorize_params(challenge))
    oauth_error(exchange(http, code, other_verifier), 400, "invalid_grant")


def test_missing_code_verifier_is_refused(http: TestClient) -> None:
    _, challenge = pkce_pair()
    code = authorization_code(http, authorize_params(challenge))
    response = http.post(
        "/auth/token",
        data={"grant_type": "authorization_code", "code": code, "redirect_uri": CALLBACK, "client_id": APP},
    )
    assert "code_verifier" in oauth_error(response, 400, "invalid_request")


def test_plain_pkce_is_refused(http: TestClient) -> None:
    verifier, _ = pkce_pair()
    params = authorize_params(verifier, code_challenge_method="plain")
    query = redirect_query(http.get("/auth/authorize", params=params))
    assert query["error"] == "invalid_request" and "S256" in query["error_description"]
    assert query["state"] == params["state"]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"code_challenge": None, "code_challenge_method": None}, "code_challenge"),
        ({"code_challenge": None}, "code_challenge"),
        ({"code_challenge_method": None}, "code_challenge_method"),
    ],
)
def test_missing_pkce_is_refused(http: TestClient, overrides: dict[str, str | None], named: str) -> None:
    _, challenge = pkce_pair()
    params = authorize_params(challenge, **overrides)
    query = redirect_query(http.get("/auth/authorize", params=params))
    assert query["error"] == "invalid_request" and named in query["error_description"]
    # and the form post cannot skip it either
    form = {**params, "username": USER, "password": PASSWORD, "patient": "P-1001"}
    assert redirect_query(http.post("/auth/authorize", data=form))["error"] == "invalid_request"


def test_code_is_single_use(http: TestClient) -> None:
    verifier, challenge = pkce_pair()
    code = authorization_code(http, authorize_params(challenge))
    assert exchange(http, code, verifier).status_code == 200
    oauth_error(exchange(http, code, verifier), 400, "invalid_grant")


def test_code_bound_to_its_redirect_uri(http: TestClient) -> None:
    verifier, challenge = pkce_pair()
    code = authorization_code(http, authorize_params(challenge))
    oauth_error(exchange(http, code, verifier, redirect_uri=OTHER_CALLBACK), 400, "invalid_grant")


def test_code_bound_to_its_client(http: TestClient) -> None:
    verifier, challenge = pkce_pair()
    code = authorization_code(http, authorize_params(challenge))
    response = exchange(
        http,
        code,
        verifier,
        client_id=CONFIDENTIAL,
        client_secret=CONFIDENTIAL_SECRET,
    )
    oauth_error(response, 400, "invalid_grant")


def test_unregistered_redirect_uri_gets_an_error_page_not_a_redirect(http: TestClient) -> None:
    _, challenge = pkce_pair()
    for redirect_uri in ("https://evil.example/callback", CALLBACK + "/", None):
        response = http.get("/auth/authorize", params=authorize_params(challenge, redirect_uri=redirect_uri))
        assert response.status_code == 400
        assert "location" not in response.headers
        assert response.headers["content-type"].startswith("text/html")
        assert "invalid_request" in response.text


def test_unknown_client_gets_an_error_page(http: TestClient) -> None:
    _, challenge = pkce_pair()
    response = http.get("/auth/authorize", params=authorize_params(challenge, client_id="stranger"))
    assert response.status_code == 400 and "location" not in response.headers
    assert "invalid_client" in response.text


def test_backend_client_cannot_use_the_authorization_endpoint(http: TestClient) -> None:
    _, challenge = pkce_pair()
    response = http.get("/auth/authorize", params=authorize_params(challenge, client_id=BACKEND))
    assert response.status_code == 400 and "location" not in response.headers


def test_wrong_password_shows_the_form_again(http: TestClient) -> None:
    _, challenge = pkce_pair()
    params = authorize_params(challenge)
    for username, password in ((USER, "wrong"), ("nobody", PASSWORD)):
        response = sign_in(http, AUTHORIZE_URL, username=username, password=password, params=params)
        assert response.status_code == 401
        assert "location" not in response.headers
        assert "wrong password" in response.text and 'name="password"' in response.text
        assert LoginForm(response).hidden == params


@pytest.mark.parametrize("aud", ["https://other.example/fhir", f"{ROOT}/other", None])
def test_aud_must_be_our_fhir_base(http: TestClient, aud: str | None) -> None:
    _, challenge = pkce_pair()
    params = authorize_params(challenge, aud=aud)
    query = redirect_query(http.get("/auth/authorize", params=params))
    assert query["error"] == "invalid_request" and "aud" in query["error_description"]
    form = {**params, "username": USER, "password": PASSWORD, "patient": "P-1001"}
    assert "code" not in redirect_query(http.post("/auth/authorize", data=form))


def test_aud_with_a_trailing_slash_is_our_base(http: TestClient) -> None:
    _, challenge = pkce_pair()
    assert http.get("/auth/authorize", params=authorize_params(challenge, aud=BASE + "/")).status_code == 200


def test_state_is_required(http: TestClient) -> None:
    _, challenge = pkce_pair()
    query = redirect_query(http.get("/auth/authorize", params=authorize_params(challenge, state=None)))
    assert query["error"] == "invalid_request" and "state" in query["error_description"]


def test_unsupported_response_type(http: TestClient) -> None:
    _, challenge = pkce_pair()
    params = authorize_params(challenge, response_type="token")
    query = redirect_query(http.get("/auth/authorize", params=params))
    assert query["error"] == "unsupported_response_type" and query["state"] == params["state"]


def test_malformed_scope_at_authorize_is_invalid_scope(http: TestClient) -> None:
    _, challenge = pkce_pair()
    params = authorize_params(challenge, scope="launch/patient patient/Observation.rr")
    assert redirect_query(http.get("/auth/authorize", params=params))["error"] == "invalid_scope"


def test_deny_sends_access_denied(http: TestClient) -> None:
    _, challenge = pkce_pair()
    params = authorize_params(challenge)
    page = http.get("/auth/authorize", params=params)
    query = redirect_query(LoginForm(page).submit(http, decision="deny"))
    assert query["error"] == "access_denied" and query["state"] == params["state"] and "code" not in query


def test_patient_outside_the_users_list_is_refused(http: TestClient) -> None:
    _, challenge = pkce_pair()
    page = http.get("/auth/authorize", params=authorize_params(challenge))
    choice = LoginForm(LoginForm(page).submit(http, username=USER, password=PASSWORD))
    response = choice.submit(http, patient="P-9999")
    assert response.status_code == 400 and "location" not in response.headers
    assert LoginForm(response).options["patient"] == ["P-1001", "P-2002"]


def test_user_without_patients_cannot_launch_with_a_patient(http: TestClient) -> None:
    _, challenge = pkce_pair()
    params = authorize_params(challenge)
    response = sign_in(http, AUTHORIZE_URL, username=LONELY_USER, password=LONELY_PASSWORD, params=params)
    assert response.status_code == 403 and "location" not in response.headers


def test_sign_in_ticket_works_once_and_only_for_its_request(http: TestClient) -> None:
    _, challenge = pkce_pair()
    page = http.get("/auth/authorize", params=authorize_params(challenge))
    choice = LoginForm(LoginForm(page).submit(http, username=USER, password=PASSWORD))
    other_request = {**choice.hidden, "state": "another-state"}
    assert http.post("/auth/authorize", data={**other_request, "patient": "P-1001"}).status_code == 401
    # the ticket was used up by that attempt
    assert choice.submit(http, patient="P-1001").status_code == 401


def test_confidential_client_authenticates_with_its_secret(
    http: TestClient, validator: TokenValidator
) -> None:
    def code_for_confidential() -> tuple[str, str]:
        verifier, challenge = pkce_pair()
        params = authorize_params(
            challenge, client_id=CONFIDENTIAL, redirect_uri="https://reports.example/cb"
        )
        return authorization_code(http, params, patient="P-1001"), verifier

    common = {"grant_type": "authorization_code", "redirect_uri": "https://reports.example/cb"}

    code, verifier = code_for_confidential()
    basic = http.post(
        "/auth/token",
        data={**common, "code": code, "code_verifier": verifier, "client_id": CONFIDENTIAL},
        auth=(CONFIDENTIAL, CONFIDENTIAL_SECRET),
    )
    assert basic.status_code == 200, basic.text
    assert validator.validate(basic.json()["access_token"]).client_id == CONFIDENTIAL

    code, verifier = code_for_confidential()
    post = http.post(
        "/auth/token",
        data={
            **common,
            "code": code,
            "code_verifier": verifier,
            "client_id": CONFIDENTIAL,
            "client_secret": CONFIDENTIAL_SECRET,
        },
    )
    assert post.status_code == 200, post.text

    code, verifier = code_for_confidential()
    wrong = http.post(
        "/auth/token",
        data={**common, "code": code, "code_verifier": verifier},
        auth=(CONFIDENTIAL, "not-the-secret"),
    )
    oauth_error(wrong, 401, "invalid_client")
    assert wrong.headers["www-authenticate"].startswith("Basic")

    code, verifier = code_for_confidential()
    missing = http.post(
        "/auth/token", data={**common, "code": code, "code_verifier": verifier, "client_id": CONFIDENTIAL}
    )
    oauth_error(missing, 401, "invalid_client")


def test_code_expires_after_its_lifetime() -> None:
    now = [1000.0]
    store = CodeStore(clock=lambda: now[0])
    owner = ResourceOwner(USER, None, "P-1001")
    store.add(AuthorizationCode("c1", APP, CALLBACK, "patient/*.rs", owner, "x" * 43, "S256", store.expiry()))
    store.add(AuthorizationCode("c2", APP, CALLBACK, "patient/*.rs", owner, "x" * 43, "S256", store.expiry()))
    now[0] += CODE_LIFETIME - 1
    assert store.take("c1", APP) is not None
    now[0] += 2
    assert store.take("c2", APP) is None
    assert len(store) == 0


# --- Scope narrowing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "registered", "backend", "granted"),
    [
        ("patient/Observation.read launch/patient", "launch/patient patient/*.rs", False,
         "patient/Observation.rs launch/patient"),
        ("user/*.* launch/patient", "user/*.rs launch/patient", False, "user/*.rs launch/patient"),
        ("patient/*.rs", "launch/patient patient/*.rs", False, ""),  # no patient context asked for
        ("user/Observation.rs", "user/Observation.rs?category=laboratory", False,
         "user/Observation.rs?category=laboratory"),
        ("user/Observation.c openid offline_access launch", "user/*.cruds openid offline_access launch",
         False, "user/Observation.c offline_access"),
        ("system/*.rs user/*.rs", "system/Patient.rs", True, "system/Patient.rs"),
        ("user/*.rs", "system/*.rs", True, ""),
    ],
)  # fmt: skip
def test_narrow_scopes(requested: str, registered: str, backend: bool, granted: str) -> None:
    scopes = narrow_scopes(requested, registered, backend=backend)
    assert " ".join([s.text for s in scopes.resources] + list(scopes.other)) == granted


def test_narrow_scopes_refuses_malformed_requests() -> None:
    with pytest.raises(InvalidScope):
        narrow_scopes("patient/Observation.sr", "patient/*.rs", backend=False)


# --- Keys, registry file, demo registry ------------------------------------------------------


def test_signing_key_is_private_to_the_owner_and_survives_restarts(settings: Settings) -> None:
    first = BuiltinAuthorizationServer(settings)
    key_file = settings.data_dir / "auth-signing-key.json"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert "d" in json.loads(key_file.read_text())
    assert BuiltinAuthorizationServer(settings).signing_key.kid == first.signing_key.kid


def test_demo_registry_is_written_when_absent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(auth="smart", base_url=BASE, data_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="fhir_facade.auth.server"):
        server = BuiltinAuthorizationServer(settings)

    path = tmp_path / "auth-clients.json"
    assert settings.resolved_clients_file == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    registry = load_registry(path)
    client = registry.client(DEMO_CLIENT_ID)
    assert client is not None and client.kind == "public"
    assert client.redirect_uris == DEMO_REDIRECT_URIS and client.scope == DEMO_SCOPE
    user = registry.user(DEMO_USERNAME)
    assert user is not None and user.fhir_user == DEMO_FHIR_USER and user.patients == DEMO_PATIENTS

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    password = warnings[0].split("password ")[1].split("'")[1]
    assert verify_secret(password, user.password_hash)
    assert password not in path.read_text()

    # The demo user can really sign in with it, and the demo app gets a token.
    app = FastAPI()
    app.include_router(server.router)
    with TestClient(app, base_url=ROOT, follow_redirects=False) as http:
        verifier, challenge = pkce_pair()
        params = authorize_params(challenge, client_id=DEMO_CLIENT_ID)
        response = sign_in(http, AUTHORIZE_URL, username=DEMO_USERNAME, password=password, params=params)
        code = redirect_query(response)["code"]
        body = exchange(http, code, verifier, client_id=DEMO_CLIENT_ID).json()
        assert body["patient"] == DEMO_PATIENTS[0]

    # Started again, it keeps the registry (and logs no new password).
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fhir_facade.auth.server"):
        BuiltinAuthorizationServer(settings)
    assert not caplog.records
    assert load_registry(path) == registry


def _jwks(key: dict[str, Any]) -> dict[str, Any]:
    return {"keys": [{"kid": "k", **key}]}


def _bad(document: dict[str, Any], where: str, **changes: Any) -> dict[str, Any]:
    section, index = where.split(":")
    document[section][int(index)].update(changes)
    return document


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: _bad(d, "clients:2", scope="system/*.rs patient/*.rs"),
         "clients[2] (client_id 'nightly-export'): a backend-service client may hold system/ scopes only"),
        (lambda d: _bad(d, "clients:0", client_secret_hash=d["clients"][1]["client_secret_hash"]),
         "clients[0] (client_id 'viewer-app'): client_secret_hash is required for confidential clients"),
        (lambda d: _bad(d, "clients:1", client_secret_hash=None),
         "clients[1] (client_id 'report-app'): client_secret_hash is required"),
        (lambda d: _bad(d, "clients:0", scope="launch/patient patient/Observation.rr"),
         "clients[0] (client_id 'viewer-app').scope: invalid SMART scope 'patient/Observation.rr'"),
        (lambda d: _bad(d, "clients:0", scope="system/*.rs"),
         "system/ scopes are for backend-service clients only"),
        (lambda d: _bad(d, "clients:0", redirect_uris=["http://127.0.0.1:9000/cb#frag"]),
         "clients[0] (client_id 'viewer-app').redirect_uris: redirect URI"),
        (lambda d: _bad(d, "clients:0", redirect_uris=[]), "needs at least one redirect URI"),
        (lambda d: _bad(d, "clients:0", kind="spa"), "clients[0] (client_id 'viewer-app').kind"),
        (lambda d: _bad(d, "clients:0", secret="plain"), "clients[0] (client_id 'viewer-app').secret: Extra"),
        (lambda d: _bad(d, "clients:2", jwks=_jwks(RSAKey.generate_key(2048).as_dict(private=True))),
         "clients[2] (client_id 'nightly-export').jwks: jwks key 0 holds private key material"),
        (lambda d: _bad(d, "clients:2", jwks=_jwks(ECKey.generate_key("P-256").as_dict())),
         "ES384 needs curve P-384"),
        (lambda d: _bad(d, "clients:2", jwks=None), "needs 'jwks' or 'jwks_url'"),
        (lambda d: _bad(d, "clients:1", client_id="viewer-app"),
         "client_id 'viewer-app' registered more than once"),
        (lambda d: _bad(d, "users:0", password_hash="secret"), "users[0] (username 'dr-who').password_hash"),
        (lambda d: _bad(d, "users:0", patients=["Patient/P-1001"]), "is not a FHIR id"),
        (lambda d: _bad(d, "users:1", fhirUser="dr who"), "users[1] (username 'nurse').fhirUser"),
    ],
)  # fmt: skip
def test_registry_validation_names_the_bad_entry(
    tmp_path: Path, rsa_key: RSAKey, ec_key: ECKey, password_hashes: dict[str, str], change: Any, message: str
) -> None:
    path = tmp_path / "clients.json"
    path.write_text(json.dumps(change(registry_document(rsa_key, ec_key, password_hashes))))
    with pytest.raises(RegistryError) as raised:
        load_registry(path)
    assert str(path) in str(raised.value)
    assert message in str(raised.value)
    settings = Settings(auth="smart", base_url=BASE, data_dir=tmp_path, auth_clients_file=path)
    with pytest.raises(RegistryError):
        BuiltinAuthorizationServer(settings)


def test_registry_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "clients.json"
    path.write_text("{clients: []")
    with pytest.raises(RegistryError, match="not JSON"):
        load_registry(path)


def test_register_backend_client(tmp_path: Path) -> None:
    path = tmp_path / "registry" / "clients.json"
    key = ECKey.generate_key("P-384", parameters={"kid": "cli-key"})
    public = {"keys": [key.as_dict(private=False)]}

    entry = register_backend_client(path, "archive-sync", public, "system/*.rs", name="Archive sync")
    assert entry.backend and entry.display_name == "Archive sync"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_registry(path).client("archive-sync") == entry

    with pytest.raises(RegistryError, match="already registered"):
        register_backend_client(path, "archive-sync", public, "system/*.rs")
    with pytest.raises(RegistryError, match="system/ scopes only"):
        register_backend_client(path, "bad-scope", public, "user/*.rs")
    with pytest.raises(RegistryError, match="private key material"):
        register_backend_client(path, "leaky", {"keys": [key.as_dict(private=True)]}, "system/*.rs")
    assert [c.client_id for c in load_registry(path).clients] == ["archive-sync"]

    # The registered client gets tokens.
    settings = Settings(auth="smart", base_url=BASE, data_dir=tmp_path, auth_clients_file=path)
    app = FastAPI()
    app.include_router(BuiltinAuthorizationServer(settings).router)
    with TestClient(app, base_url=ROOT) as http:
        response = backend_token(http, client_assertion(key, "archive-sync", TOKEN_URL), "system/Patient.rs")
        assert response.status_code == 200, response.text
        assert response.json()["scope"] == "system/Patient.rs"


def test_register_backend_client_into_the_demo_registry(tmp_path: Path) -> None:
    settings = Settings(auth="smart", base_url=BASE, data_dir=tmp_path)
    BuiltinAuthorizationServer(settings)  # writes the demo registry
    key = RSAKey.generate_key(2048, parameters={"kid": "k1"})
    register_backend_client(settings.resolved_clients_file, "exporter", _jwks(key.as_dict()), "system/*.rs")
    registry = load_registry(settings.resolved_clients_file)
    assert [c.client_id for c in registry.clients] == [DEMO_CLIENT_ID, "exporter"]
    assert registry.user(DEMO_USERNAME) is not None


def test_plain_http_on_a_public_host_is_refused(tmp_path: Path) -> None:
    settings = Settings(auth="smart", base_url="http://facade.hospital.example/fhir", data_dir=tmp_path)
    with pytest.raises(ValueError, match="https"):
        BuiltinAuthorizationServer(settings)
