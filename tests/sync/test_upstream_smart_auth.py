"""SMART Backend Services authentication of the upstream sync client (SMART App Launch 2.x
backend-services.html), against the real token endpoint of tests/upstream_fhir/server.mjs, which
verifies the signed client assertions with node:crypto: a different implementation from the one
that signs them (joserfc)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt
from joserfc.jwk import import_key

from fhir_facade.embedded import EmbeddedOrthanc
from fhir_facade.sync.upstream import Outcome, UpstreamClient, UpstreamSettings
from fhir_facade.sync.upstream_auth import (
    CLIENT_ASSERTION_TYPE,
    SmartBackendAuth,
    SmartConfigurationError,
    TokenRequestRefused,
)
from tests.conftest import serve
from tests.upstream_fhir_server import UpstreamFhirServer

CLIENT_ID = "facade-sync"
RSA_KID = "sync-rsa-1"
EC_KID = "sync-ec-1"


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _public_jwk(pem: bytes, key_type: str, kid: str, alg: str) -> dict[str, Any]:
    key = import_key(pem, "RSA") if key_type == "RSA" else import_key(pem, "EC")
    return {**key.as_dict(private=False), "kid": kid, "alg": alg, "use": "sig"}


def _jwks_of(keys: dict[str, Path]) -> dict[str, Any]:
    """The public half of the registered keys, as the client would publish it."""
    return {
        "keys": [
            _public_jwk(keys["RS384"].read_bytes(), "RSA", RSA_KID, "RS384"),
            _public_jwk(keys["ES384"].read_bytes(), "EC", EC_KID, "ES384"),
        ]
    }


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The client's private keys as PEM files, as an operator would deploy them."""
    folder = tmp_path_factory.mktemp("smart-keys")
    pems = {
        "RS384": _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "ES384": _pem(ec.generate_private_key(ec.SECP384R1())),
        "other": _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    }
    paths = {}
    for name, pem in pems.items():
        paths[name] = folder / f"{name}.pem"
        paths[name].write_bytes(pem)
    return paths


@pytest.fixture(scope="module")
def smart_upstream(
    tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path]
) -> Iterator[UpstreamFhirServer]:
    with UpstreamFhirServer(
        tmp_path_factory.mktemp("upstream-smart"), smart_jwks=_jwks_of(keys), smart_client_id=CLIENT_ID
    ) as server:
        yield server


@pytest.fixture
def upstream(smart_upstream: UpstreamFhirServer) -> UpstreamFhirServer:
    smart_upstream.reset()
    return smart_upstream


def _settings(
    upstream: UpstreamFhirServer, key: Path, algorithm: str = "RS384", **overrides: Any
) -> UpstreamSettings:
    fields: dict[str, Any] = {
        "base_url": upstream.base_url,
        "auth": "smart-backend",
        "token_url": upstream.token_url,
        "client_id": CLIENT_ID,
        "private_key_path": key,
        "key_id": RSA_KID if algorithm == "RS384" else EC_KID,
        "algorithm": algorithm,
        **overrides,
    }
    return UpstreamSettings(**fields)


def _patient(id_: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": id_, "name": [{"family": "Backend"}]}


def _auth(upstream: UpstreamFhirServer, key: Path, **overrides: Any) -> SmartBackendAuth:
    arguments: dict[str, Any] = {
        "token_url": upstream.token_url,
        "client_id": CLIENT_ID,
        "private_key_pem": key.read_bytes(),
        "key_id": RSA_KID,
        **overrides,
    }
    return SmartBackendAuth(**arguments)


def _token_request(
    upstream: UpstreamFhirServer, assertion: str, scope: str = "system/*.read"
) -> httpx.Response:
    return httpx.post(
        upstream.token_url,
        data={
            "grant_type": "client_credentials",
            "scope": scope,
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": assertion,
        },
    )


@pytest.mark.parametrize("algorithm", ["RS384", "ES384"])
def test_put_with_a_smart_token_is_readable_upstream(
    upstream: UpstreamFhirServer, keys: dict[str, Path], algorithm: str
) -> None:
    client = UpstreamClient(_settings(upstream, keys[algorithm], algorithm))
    try:
        answer = client.put(_patient(f"smart-{algorithm.lower()}"))
        assert (answer.outcome, answer.status) == (Outcome.DONE, 200), answer.detail
        stored = client.read("Patient", f"smart-{algorithm.lower()}")
    finally:
        client.close()
    assert stored is not None and stored["name"] == [{"family": "Backend"}]
    smart = upstream.stats()["smart"]
    assert (smart["enabled"], smart["tokens_issued"], smart["invalid_token"]) == (True, 1, 0)


def test_fhir_requests_without_a_token_are_401_invalid_token(upstream: UpstreamFhirServer) -> None:
    for headers in ({}, {"Authorization": "Bearer not-a-token-we-issued"}):
        response = httpx.get(f"{upstream.base_url}/Patient", headers=headers)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="fhir", error="invalid_token"')
        assert response.json()["issue"][0]["code"] == "login"
    # The capability statement stays public, and names the token endpoint (oauth-uris).
    metadata = httpx.get(f"{upstream.base_url}/metadata").json()
    oauth_uris = metadata["rest"][0]["security"]["extension"][0]
    assert oauth_uris["extension"] == [{"url": "token", "valueUri": upstream.token_url}]


def test_the_token_is_reused_across_requests(upstream: UpstreamFhirServer, keys: dict[str, Path]) -> None:
    client = UpstreamClient(_settings(upstream, keys["RS384"]))
    try:
        for n in range(3):
            assert client.put(_patient(f"reuse-{n}")).outcome is Outcome.DONE
        assert client.delete("Patient", "reuse-0").outcome is Outcome.DONE
    finally:
        client.close()
    smart = upstream.stats()["smart"]
    assert (smart["token_requests"], smart["tokens_issued"]) == (1, 1)


def test_a_revoked_token_is_renewed_once_transparently(
    upstream: UpstreamFhirServer, keys: dict[str, Path]
) -> None:
    client = UpstreamClient(_settings(upstream, keys["RS384"]))
    try:
        assert client.put(_patient("revoked-1")).outcome is Outcome.DONE
        assert upstream.revoke_tokens() >= 1
        answer = client.put(_patient("revoked-2"))
        assert (answer.outcome, answer.status) == (Outcome.DONE, 200), answer.detail
        assert client.put(_patient("revoked-3")).outcome is Outcome.DONE
    finally:
        client.close()
    stats = upstream.stats()
    assert (stats["smart"]["tokens_issued"], stats["smart"]["invalid_token"]) == (2, 1)
    assert stats["by_status"] == {"200": 3, "401": 1}  # the 401'd PUT went again, once


def test_a_token_near_its_expiry_is_replaced_before_use(
    upstream: UpstreamFhirServer, keys: dict[str, Path]
) -> None:
    auth = _auth(upstream, keys["RS384"])
    upstream.smart(CLIENT_ID, _jwks_of(keys), token_lifetime=2)
    try:
        with httpx.Client(base_url=upstream.base_url, auth=auth) as http:
            assert http.get("/Patient").status_code == 200
            time.sleep(1.2)  # past the refresh point (half of a 2 s token's life), before expiry
            assert http.get("/Patient").status_code == 200
    finally:
        upstream.smart(CLIENT_ID, _jwks_of(keys), token_lifetime=300)
    smart = upstream.stats()["smart"]
    assert (smart["tokens_issued"], smart["invalid_token"]) == (2, 0)  # renewed without a 401


def test_a_wrong_key_is_a_typed_error_naming_the_oauth_error(
    upstream: UpstreamFhirServer, keys: dict[str, Path]
) -> None:
    auth = _auth(upstream, keys["other"])  # signs as RSA_KID with a key the server does not know
    with (
        httpx.Client(base_url=upstream.base_url, auth=auth) as http,
        pytest.raises(TokenRequestRefused) as info,
    ):
        http.get("/Patient")
    assert (info.value.status, info.value.error) == (400, "invalid_client")
    assert "signature" in str(info.value.description)
    assert "invalid_client" in str(info.value)
    assert upstream.stats()["total"] == 0  # nothing reached the FHIR server

    # The sync worker sees it as "try again later": nothing was written, nothing is lost.
    client = UpstreamClient(_settings(upstream, keys["other"]))
    try:
        answer = client.put(_patient("wrong-key"))
    finally:
        client.close()
    assert (answer.outcome, answer.status) == (Outcome.RETRY, None)
    assert "invalid_client" in answer.detail


def test_a_non_system_scope_is_refused(upstream: UpstreamFhirServer, keys: dict[str, Path]) -> None:
    auth = _auth(upstream, keys["RS384"], scope="patient/*.read")
    with (
        httpx.Client(base_url=upstream.base_url, auth=auth) as http,
        pytest.raises(TokenRequestRefused) as info,
    ):
        http.get("/Patient")
    assert info.value.error == "invalid_scope"


def test_the_server_refuses_a_replayed_jti(upstream: UpstreamFhirServer, keys: dict[str, Path]) -> None:
    assertion = _auth(upstream, keys["RS384"]).client_assertion()
    first = _token_request(upstream, assertion)
    assert first.status_code == 200, first.text
    assert first.headers["Cache-Control"] == "no-store"
    token = first.json()
    assert token["token_type"] == "bearer" and token["expires_in"] > 0 and token["scope"] == "system/*.read"

    replay = _token_request(upstream, assertion)
    assert replay.status_code == 400
    assert replay.json()["error"] == "invalid_client"
    assert "replay" in replay.json()["error_description"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"aud": "http://elsewhere.example/token"}, "is not the token endpoint"),
        ({"exp": 600}, "more than five minutes"),
        ({"exp": -10}, "expired"),
        ({"sub": "someone-else"}, "iss and sub"),
    ],
)
def test_the_server_checks_the_assertion_claims(
    upstream: UpstreamFhirServer, keys: dict[str, Path], change: dict[str, Any], reason: str
) -> None:
    claims: dict[str, Any] = {
        "iss": CLIENT_ID,
        "sub": CLIENT_ID,
        "aud": upstream.token_url,
        "exp": int(time.time()) + 60,
        "jti": uuid.uuid4().hex,
        **change,
    }
    if "exp" in change:
        claims["exp"] = int(time.time()) + change["exp"]
    key = import_key(keys["RS384"].read_bytes(), "RSA")
    assertion = jwt.encode({"alg": "RS384", "kid": RSA_KID}, claims, key, algorithms=["RS384"])
    response = _token_request(upstream, assertion)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_client"
    assert reason in response.json()["error_description"]


def test_the_token_endpoint_is_discovered_from_smart_configuration(
    upstream: UpstreamFhirServer, keys: dict[str, Path]
) -> None:
    configuration = httpx.get(f"{upstream.base_url}/.well-known/smart-configuration")
    assert configuration.status_code == 200
    assert configuration.json()["token_endpoint"] == upstream.token_url
    assert configuration.json()["grant_types_supported"] == ["client_credentials"]
    assert configuration.json()["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert configuration.json()["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]

    auth = SmartBackendAuth(
        None, CLIENT_ID, keys["ES384"].read_bytes(), EC_KID, "ES384", fhir_base_url=upstream.base_url
    )
    assert auth.token_url is None
    with httpx.Client(base_url=upstream.base_url, auth=auth) as http:
        assert http.get("/Patient").status_code == 200
    assert auth.token_url == upstream.token_url

    client = UpstreamClient(_settings(upstream, keys["RS384"], token_url=None))
    try:
        assert client.put(_patient("discovered")).outcome is Outcome.DONE
    finally:
        client.close()


def test_discovery_without_a_smart_configuration_is_a_typed_error(
    upstream: UpstreamFhirServer, keys: dict[str, Path]
) -> None:
    auth = _auth(upstream, keys["RS384"], token_url=None, fhir_base_url=f"{upstream.base_url}/nowhere")
    with httpx.Client(base_url=upstream.base_url, auth=auth) as http, pytest.raises(SmartConfigurationError):
        http.get("/Patient")


def test_bad_settings_are_refused_early(keys: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fhir_base_url"):
        SmartBackendAuth(None, CLIENT_ID, keys["RS384"].read_bytes(), RSA_KID)
    with pytest.raises(ValueError, match="private_key_pem"):
        SmartBackendAuth("http://x/token", CLIENT_ID, keys["RS384"].read_bytes(), RSA_KID, "ES384")
    with pytest.raises(ValueError, match="algorithm"):
        SmartBackendAuth("http://x/token", CLIENT_ID, keys["RS384"].read_bytes(), RSA_KID, "HS256")
    with pytest.raises(ValueError, match="client_id"):
        UpstreamClient(
            UpstreamSettings(base_url="http://x/fhir", auth="smart-backend", private_key_path=keys["RS384"])
        )
    with pytest.raises(ValueError, match="private_key_path"):
        UpstreamClient(
            UpstreamSettings(
                base_url="http://x/fhir",
                auth="smart-backend",
                client_id=CLIENT_ID,
                key_id=RSA_KID,
                private_key_path=tmp_path / "missing.pem",
            )
        )


def test_the_facade_syncs_through_smart_backend_services(
    upstream: UpstreamFhirServer, keys: dict[str, Path], loaded_orthanc: EmbeddedOrthanc
) -> None:
    """End to end from configuration alone: FACADE_UPSTREAM_AUTH=smart-backend, token endpoint
    discovered from the upstream's smart-configuration."""
    with (
        serve(
            {
                "dicomweb_url": loaded_orthanc.dicomweb_url,
                "fhir_upstream_url": upstream.base_url,
                "sync_poll_interval": 0.1,
                "upstream_auth": "smart-backend",
                "upstream_smart_client_id": CLIENT_ID,
                "upstream_smart_private_key_path": keys["ES384"],
                "upstream_smart_key_id": EC_KID,
                "upstream_smart_algorithm": "ES384",
            }
        ) as server,
        httpx.Client(base_url=server.base_url, timeout=30) as fhir,
    ):
        created = fhir.post(
            "/Task",
            json={"resourceType": "Task", "status": "requested", "intent": "order"},
            headers={"Content-Type": "application/fhir+json"},
        ).json()
        reader = UpstreamClient(_settings(upstream, keys["RS384"]))
        try:
            deadline = time.monotonic() + 10
            while reader.read("Task", created["id"]) is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert reader.read("Task", created["id"]) is not None
        finally:
            reader.close()
    assert upstream.stats()["smart"]["tokens_issued"] >= 2


def test_a_fixed_bearer_token_is_sent(upstream: UpstreamFhirServer, keys: dict[str, Path]) -> None:
    """FACADE_UPSTREAM_AUTH=bearer: a token obtained out of band (here from the same server)."""
    token = _token_request(upstream, _auth(upstream, keys["RS384"]).client_assertion()).json()["access_token"]
    bearer = UpstreamClient(UpstreamSettings(base_url=upstream.base_url, auth="bearer", token=token))
    try:
        assert bearer.put(_patient("bearer-1")).outcome is Outcome.DONE
    finally:
        bearer.close()
    wrong = UpstreamClient(UpstreamSettings(base_url=upstream.base_url, auth="bearer", token="forged"))
    try:
        refused = wrong.put(_patient("bearer-2"))
    finally:
        wrong.close()
    assert refused.status == 401


def test_basic_auth_sends_the_credentials() -> None:
    # The test upstream has no basic-auth realm; the header is checked at the transport.
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={})

    client = UpstreamClient(
        UpstreamSettings(
            base_url="http://upstream.invalid/fhir", auth="basic", username="sync", password="s3cret"
        ),
        transport=httpx.MockTransport(record),
    )
    client.put(_patient("basic-1"))
    assert seen[0].headers["authorization"] == httpx.BasicAuth("sync", "s3cret")._auth_header
