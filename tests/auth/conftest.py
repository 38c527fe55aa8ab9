"""A facade in SMART resource-server mode (FACADE_AUTH=smart) that trusts a test issuer: tokens are
minted per test with exactly the scopes and patient context the test is about."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from fhir_facade.embedded import EmbeddedOrthanc, free_port
from tests.auth.issuer import TestIssuer
from tests.conftest import LiveServer, serve

CORS_ORIGIN = "https://viewer.hospital.example"


#: The one rest-hook endpoint the secured server accepts (a closed port: nothing is delivered).
MATRIX_HOOK = "http://127.0.0.1:9/matrix-hook"


@pytest.fixture(scope="session")
def secured_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def issuer(secured_port: int) -> Iterator[TestIssuer]:
    test_issuer = TestIssuer(audience=f"http://127.0.0.1:{secured_port}/fhir")
    yield test_issuer
    test_issuer.close()


@pytest.fixture(scope="session")
def secured(loaded_orthanc: EmbeddedOrthanc, issuer: TestIssuer, secured_port: int) -> Iterator[LiveServer]:
    with serve(
        {
            **issuer.facade_settings,
            "dicomweb_url": loaded_orthanc.dicomweb_url,
            "issuer_systems": {"HOSPITAL-A": "urn:oid:1.2.3.4.5"},
            "cors_origins": [CORS_ORIGIN],
            "subscription_endpoints": [MATRIX_HOOK],
        },
        port=secured_port,
    ) as server:
        yield server


@pytest.fixture
def client(secured: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=secured.base_url, timeout=30) as http:
        yield http
