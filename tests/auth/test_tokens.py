"""Bearer JWT validation against a real JWKS endpoint (a local HTTP server): the good token, and
every forgery and mistake RFC 8725 warns about."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from fhir_facade.auth.tokens import InvalidToken, JwksCache, TokenValidator
from tests.auth.issuer import JwksServer

ISSUER = "https://auth.hospital.example"
AUDIENCE = "http://127.0.0.1:8080/fhir"


@pytest.fixture(scope="module")
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def rsa_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})


@pytest.fixture
def validator(jwks_server: JwksServer, rsa_key: RSAKey) -> TokenValidator:
    jwks_server.jwks = {"keys": [rsa_key.as_dict(private=False)]}
    return TokenValidator(
        issuer=ISSUER, audience=AUDIENCE, keys=JwksCache(jwks_server.url, refresh_interval=0)
    )


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "clinician-7",
        "client_id": "viewer-app",
        "scope": "launch/patient patient/ImagingStudy.rs",
        "patient": "P-1001",
        "exp": now + 300,
        "iat": now,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def signed(key: Any, alg: str = "RS384", **overrides: Any) -> str:
    return jwt.encode({"alg": alg, "kid": key.kid}, claims(**overrides), key, algorithms=[alg])


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_a_good_token_gives_its_claims(validator: TokenValidator, rsa_key: RSAKey) -> None:
    validated = validator.validate(signed(rsa_key))
    assert (validated.subject, validated.client_id, validated.patient) == (
        "clinician-7",
        "viewer-app",
        "P-1001",
    )
    assert validated.scope == "launch/patient patient/ImagingStudy.rs"


def test_audience_may_be_a_list(validator: TokenValidator, rsa_key: RSAKey) -> None:
    validator.validate(signed(rsa_key, aud=["https://other.example", AUDIENCE]))


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"exp": int(time.time()) - 120}, "expired"),
        ({"exp": None}, "no expiry"),
        ({"nbf": int(time.time()) + 600}, "not valid yet"),
        ({"aud": "https://other.example/fhir"}, "not " + AUDIENCE),
        ({"iss": "https://evil.example"}, "not trusted"),
        ({"iss": None}, "not trusted"),
        ({"aud": None}, "not " + AUDIENCE),
        ({"iat": int(time.time()) + 600}, r"not valid yet \(iat\)"),
        ({"exp": "tomorrow"}, "no expiry"),
        ({"sub": 7}, "sub claim is invalid"),
    ],
)
def test_wrong_claims_are_refused(
    validator: TokenValidator, rsa_key: RSAKey, overrides: dict[str, Any], reason: str
) -> None:
    with pytest.raises(InvalidToken, match=reason):
        validator.validate(signed(rsa_key, **overrides))


def test_alg_none_is_refused(validator: TokenValidator) -> None:
    token = f"{b64(json.dumps({'alg': 'none'}).encode())}.{b64(json.dumps(claims()).encode())}."
    with pytest.raises(InvalidToken, match="'none' is not accepted"):
        validator.validate(token)


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("not-a-jwt", "not a JWS compact serialisation"),
        ("a.b.c", "not a JWS compact serialisation"),
        (f"{b64(b'[' * 1000)}.{b64(b'{}')}.", "not a JWS compact serialisation"),  # too deep, too big
        (f"{b64(json.dumps({'kid': 'rsa-1'}).encode())}.{b64(b'{}')}.", "None is not accepted"),
    ],
)
def test_unreadable_headers_are_refused(validator: TokenValidator, token: str, reason: str) -> None:
    with pytest.raises(InvalidToken, match=reason):
        validator.validate(token)


def test_hmac_with_the_public_key_as_secret_is_refused(validator: TokenValidator, rsa_key: RSAKey) -> None:
    """The algorithm-confusion forgery: HS256 'signed' with the issuer's public key."""
    header = b64(json.dumps({"alg": "HS256", "kid": rsa_key.kid}).encode())
    payload = b64(json.dumps(claims()).encode())
    secret = rsa_key.as_pem(private=False)
    signature = b64(hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    with pytest.raises(InvalidToken, match="'HS256' is not accepted"):
        validator.validate(f"{header}.{payload}.{signature}")


def test_a_forged_signature_is_refused(validator: TokenValidator) -> None:
    impostor = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})  # same kid, other key
    with pytest.raises(InvalidToken, match="signature"):
        validator.validate(signed(impostor))


def test_a_tampered_payload_is_refused(validator: TokenValidator, rsa_key: RSAKey) -> None:
    header, _, signature = signed(rsa_key).split(".")
    payload = b64(json.dumps(claims(patient="P-9999")).encode())
    with pytest.raises(InvalidToken, match="signature"):
        validator.validate(f"{header}.{payload}.{signature}")


def test_a_rotated_key_is_fetched_once(jwks_server: JwksServer, rsa_key: RSAKey) -> None:
    keys = JwksCache(jwks_server.url, refresh_interval=0)
    validator = TokenValidator(issuer=ISSUER, audience=AUDIENCE, keys=keys)
    jwks_server.jwks = {"keys": [rsa_key.as_dict(private=False)]}
    validator.validate(signed(rsa_key))
    rotated = ECKey.generate_key("P-384", parameters={"kid": "ec-2"})
    jwks_server.jwks = {"keys": [rsa_key.as_dict(private=False), rotated.as_dict(private=False)]}
    assert validator.validate(signed(rotated, alg="ES384")).subject == "clinician-7"
    assert keys.fetches == 2


def test_unknown_kids_do_not_hammer_the_issuer(jwks_server: JwksServer, rsa_key: RSAKey) -> None:
    jwks_server.jwks = {"keys": [rsa_key.as_dict(private=False)]}
    keys = JwksCache(jwks_server.url, refresh_interval=3600)
    validator = TokenValidator(issuer=ISSUER, audience=AUDIENCE, keys=keys)
    stranger = RSAKey.generate_key(2048, parameters={"kid": "unknown"})
    for _ in range(5):
        with pytest.raises(InvalidToken, match="no key with kid"):
            validator.validate(signed(stranger))
    assert keys.fetches == 1


def test_garbage_is_refused(validator: TokenValidator) -> None:
    with pytest.raises(InvalidToken):
        validator.validate("not-a-jwt")
