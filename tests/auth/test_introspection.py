"""Opaque tokens through RFC 7662 introspection: a real loopback introspection endpoint that knows a few
tokens, the validator on its own and the whole facade configured with it."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from fhir_facade.auth.tokens import BearerValidator, IntrospectionValidator, InvalidToken
from fhir_facade.embedded import EmbeddedOrthanc, free_port
from tests.conftest import ok_json, outcome, serve
from tests.dicom_factory import CORPUS
from tests.loopback import Answer, RecordingServer, json_answer

ISSUER = "https://as.hospital.example"
CLIENT = ("facade", "s3cret")


class IntrospectionServer:
    """Answers POST /introspect for the tokens in `.tokens` (others: inactive); records the calls."""

    def __init__(self) -> None:
        self.tokens: dict[str, dict[str, Any]] = {}
        self.server = RecordingServer(self._answer).__enter__()
        self.url = f"{self.server.url}/introspect"

    def _answer(self, method: str, path: str, body: bytes) -> Answer:
        token = parse_qs(body.decode()).get("token", [""])[0]
        return json_answer(self.tokens.get(token, {"active": False}))

    @property
    def calls(self) -> int:
        return len(self.server.requests)

    @property
    def credentials(self) -> list[str]:
        return [r.headers.get("authorization", "") for r in self.server.requests]


@pytest.fixture(scope="module")
def introspection() -> Iterator[IntrospectionServer]:
    server = IntrospectionServer()
    yield server
    server.server.__exit__(None, None, None)


def _active(audience: str, scope: str, **extra: Any) -> dict[str, Any]:
    return {
        "active": True,
        "iss": ISSUER,
        "aud": audience,
        "scope": scope,
        "client_id": "ehr",
        "sub": "dr-who",
        "exp": int(time.time()) + 300,
        **extra,
    }


def _validator(url: str, audience: str) -> IntrospectionValidator:
    return IntrospectionValidator(
        url=url, client_id=CLIENT[0], client_secret=CLIENT[1], issuer=ISSUER, audience=audience
    )


def test_active_token_is_cached_and_authenticated(introspection: IntrospectionServer) -> None:
    audience = "http://127.0.0.1:1/fhir"
    introspection.tokens["opaque-1"] = _active(audience, "user/*.rs", patient="P-1001")
    validator = _validator(introspection.url, audience)
    before = introspection.calls
    claims = validator.validate("opaque-1")
    assert claims.scope == "user/*.rs" and claims.patient == "P-1001" and claims.client_id == "ehr"
    validator.validate("opaque-1")
    assert introspection.calls == before + 1  # the second answer came from the cache
    expected = "Basic " + base64.b64encode(f"{CLIENT[0]}:{CLIENT[1]}".encode()).decode()
    assert introspection.credentials[-1] == expected


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ({"active": False}, "not active"),
        ({"aud": "http://other.example/fhir"}, "is for"),
        ({"iss": "https://evil.example"}, "not trusted"),
        ({"exp": int(time.time()) - 600}, "expired"),
    ],
)
def test_refused_answers(introspection: IntrospectionServer, answer: dict[str, Any], reason: str) -> None:
    audience = "http://127.0.0.1:2/fhir"
    token = f"opaque-{reason.replace(' ', '-')}"
    introspection.tokens[token] = {**_active(audience, "user/*.rs"), **answer}
    with pytest.raises(InvalidToken, match=reason):
        _validator(introspection.url, audience).validate(token)


def test_unreachable_endpoint_is_an_invalid_token() -> None:
    validator = _validator(f"http://127.0.0.1:{free_port()}/introspect", "http://x/fhir")
    with pytest.raises(InvalidToken, match="could not be introspected"):
        validator.validate("opaque")


def test_jwts_and_opaque_tokens_go_their_own_ways(introspection: IntrospectionServer) -> None:
    validator = BearerValidator(None, _validator(introspection.url, "http://127.0.0.1:3/fhir"))
    with pytest.raises(InvalidToken, match="not active"):
        validator.validate("a.b.c")  # no JWT validator configured: introspected like any token
    with pytest.raises(InvalidToken, match="no introspection"):
        BearerValidator(None, None).validate("opaque")


def test_facade_with_introspection_only(
    loaded_orthanc: EmbeddedOrthanc, introspection: IntrospectionServer
) -> None:
    port = free_port()
    audience = f"http://127.0.0.1:{port}/fhir"
    introspection.tokens["ehr-token"] = _active(audience, "user/ImagingStudy.rs")
    settings = {
        "auth": "smart",
        "auth_issuer": ISSUER,
        "auth_introspection_url": introspection.url,
        "auth_introspection_client_id": CLIENT[0],
        "auth_introspection_client_secret": CLIENT[1],
        "dicomweb_url": loaded_orthanc.dicomweb_url,
    }
    study = CORPUS["mueller_mr_brain"].study_uid
    with serve(settings, port=port) as server, httpx.Client(base_url=server.base_url, timeout=30) as http:
        ok_json(http.get(f"ImagingStudy/{study}", headers={"Authorization": "Bearer ehr-token"}))
        refused = http.get(f"ImagingStudy/{study}", headers={"Authorization": "Bearer unknown-token"})
        outcome(refused, 401, "login")
        assert 'error="invalid_token"' in refused.headers["www-authenticate"]
        config = http.get(".well-known/smart-configuration").json()
        assert config["introspection_endpoint"] == introspection.url
