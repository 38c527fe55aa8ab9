"""FACADE_AUTH=smart over real HTTP: what a request without a usable token gets (RFC 6750), the
public discovery documents, CORS for browser apps, and where Endpoint.address points."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey

from tests.auth.conftest import CORS_ORIGIN
from tests.auth.issuer import TestIssuer
from tests.conftest import LiveServer, ok_json, outcome
from tests.dicom_factory import CORPUS

STUDY = CORPUS["mueller_mr_brain"].study_uid
READ_ALL = "system/*.rs"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _challenge(response: httpx.Response) -> str:
    return response.headers["www-authenticate"]


def test_no_token_is_401_with_a_bare_bearer_challenge(client: httpx.Client) -> None:
    response = client.get(f"ImagingStudy/{STUDY}")
    body = outcome(response, 401, "login")
    assert _challenge(response).startswith("Bearer ")
    assert "error=" not in _challenge(response)  # RFC 6750 3.1: no error code when no token was sent
    assert "bearer token" in body["issue"][0]["diagnostics"]


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer a b", "Token abc"])
def test_malformed_authorization_header_is_invalid_request(client: httpx.Client, header: str) -> None:
    response = client.get("ImagingStudy", headers={"Authorization": header})
    outcome(response, 401, "login")
    assert 'error="invalid_request"' in _challenge(response)


def test_good_token_reads(client: httpx.Client, issuer: TestIssuer) -> None:
    body = ok_json(client.get(f"ImagingStudy/{STUDY}", headers=issuer.headers(READ_ALL)))
    assert body["id"] == STUDY


def _refused(client: httpx.Client, token: str) -> str:
    response = client.get(f"ImagingStudy/{STUDY}", headers={"Authorization": f"Bearer {token}"})
    body = outcome(response, 401, "login")
    assert 'error="invalid_token"' in _challenge(response)
    assert body["issue"][0]["details"]["coding"][0]["code"] == "invalid_token"
    return str(body["issue"][0]["diagnostics"])


def test_expired_token(client: httpx.Client, issuer: TestIssuer) -> None:
    now = int(time.time())
    assert "expired" in _refused(client, issuer.mint(READ_ALL, iat=now - 900, exp=now - 600))


def test_not_yet_valid_token(client: httpx.Client, issuer: TestIssuer) -> None:
    assert "not valid yet" in _refused(client, issuer.mint(READ_ALL, nbf=int(time.time()) + 600))


def test_token_without_expiry(client: httpx.Client, issuer: TestIssuer) -> None:
    claims = issuer.claims(READ_ALL)
    del claims["exp"]
    token = jwt.encode({"alg": "ES256", "kid": "test-key-1"}, claims, issuer.key)
    assert "no expiry" in _refused(client, token)


def test_wrong_audience(client: httpx.Client, issuer: TestIssuer) -> None:
    assert "is for" in _refused(client, issuer.mint(READ_ALL, aud="http://other.example/fhir"))


def test_unknown_issuer(client: httpx.Client, issuer: TestIssuer) -> None:
    assert "not trusted" in _refused(client, issuer.mint(READ_ALL, iss="https://evil.example"))


def test_forged_signature_same_kid(client: httpx.Client, issuer: TestIssuer) -> None:
    forger = ECKey.generate_key("P-256", parameters={"kid": "test-key-1"}, private=True)
    assert "signature" in _refused(client, issuer.mint(READ_ALL, key=forger))


def test_alg_none(client: httpx.Client, issuer: TestIssuer) -> None:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(issuer.claims(READ_ALL)).encode())
    assert "not accepted" in _refused(client, f"{header}.{payload}.")


def test_hs256_with_the_public_key_as_secret(client: httpx.Client, issuer: TestIssuer) -> None:
    header = _b64(json.dumps({"alg": "HS256", "kid": "test-key-1"}).encode())
    payload = _b64(json.dumps(issuer.claims(READ_ALL)).encode())
    secret = json.dumps(issuer.key.as_dict(private=False)).encode()
    signature = _b64(hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    assert "not accepted" in _refused(client, f"{header}.{payload}.{signature}")


def test_tampered_scope(client: httpx.Client, issuer: TestIssuer) -> None:
    header, payload, signature = issuer.mint("patient/Observation.rs", patient="P-1001").split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["scope"] = "system/*.cruds"
    assert "signature" in _refused(client, f"{header}.{_b64(json.dumps(claims).encode())}.{signature}")


def test_opaque_token_without_introspection(client: httpx.Client) -> None:
    assert "introspection" in _refused(client, "d6f1c0ffee")


def test_malformed_scope_makes_the_token_invalid(client: httpx.Client, issuer: TestIssuer) -> None:
    assert "scope" in _refused(client, issuer.mint("patient/Observation.rr", patient="P-1001"))


def test_missing_scope_is_403_insufficient_scope(client: httpx.Client, issuer: TestIssuer) -> None:
    response = client.get(f"ImagingStudy/{STUDY}", headers=issuer.headers("system/Observation.rs"))
    body = outcome(response, 403, "forbidden")
    challenge = _challenge(response)
    assert 'error="insufficient_scope"' in challenge and 'scope="system/ImagingStudy.rs"' in challenge
    assert body["issue"][0]["details"]["coding"][0]["code"] == "insufficient_scope"


def test_metadata_is_public_and_advertises_smart(client: httpx.Client, secured: LiveServer) -> None:
    statement = ok_json(client.get("metadata"))
    security = statement["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    assert security["cors"] is True
    (oauth,) = [e for e in security["extension"] if e["url"].endswith("/oauth-uris")]
    uris = {e["url"]: e["valueUri"] for e in oauth["extension"]}
    assert uris["token"] == "https://auth.hospital.example/token"


def test_smart_configuration(client: httpx.Client, issuer: TestIssuer) -> None:
    response = client.get(".well-known/smart-configuration")
    assert response.status_code == 200
    config = response.json()
    for field in (
        "token_endpoint",
        "capabilities",
        "code_challenge_methods_supported",
        "grant_types_supported",
    ):
        assert field in config
    assert config["code_challenge_methods_supported"] == ["S256"]  # never "plain"
    assert config["issuer"] == issuer.issuer
    assert config["jwks_uri"] == issuer.jwks.url
    assert "permission-v2" in config["capabilities"]


def test_cors_preflight_and_exposed_headers(client: httpx.Client, issuer: TestIssuer) -> None:
    preflight = client.options(
        "ImagingStudy",
        headers={
            "Origin": CORS_ORIGIN,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == CORS_ORIGIN
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    created = client.post(
        "Observation",
        json={"resourceType": "Observation", "status": "final", "code": {"text": "cors"}},
        headers={
            "Origin": CORS_ORIGIN,
            "Content-Type": "application/fhir+json",
            **issuer.headers("user/*.cruds"),
        },
    )
    assert created.status_code == 201
    exposed = created.headers["access-control-expose-headers"].lower()
    for name in ("location", "etag", "content-location"):
        assert name in exposed
    assert created.headers["access-control-allow-origin"] == CORS_ORIGIN


def test_cors_refuses_other_origins(client: httpx.Client) -> None:
    preflight = client.options(
        "ImagingStudy",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_on_discovery(client: httpx.Client) -> None:
    response = client.get(".well-known/smart-configuration", headers={"Origin": CORS_ORIGIN})
    assert response.headers["access-control-allow-origin"] == CORS_ORIGIN


def test_endpoint_address_is_the_token_guarded_proxy(
    client: httpx.Client, issuer: TestIssuer, secured: LiveServer
) -> None:
    endpoint = ok_json(client.get("Endpoint/dicom-wado-rs", headers=issuer.headers("user/Endpoint.rs")))
    assert endpoint["address"] == f"http://127.0.0.1:{secured.port}/dicom-web"
