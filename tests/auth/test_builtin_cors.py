"""CORS on the built-in authorization server's token endpoint: a browser SMART app exchanges its code
there from the configured origin, and no other."""

from __future__ import annotations

from pathlib import Path

import httpx

from fhir_facade.embedded import EmbeddedOrthanc
from tests.conftest import serve

ORIGIN = "https://app.hospital.example"


def test_token_endpoint_answers_preflights_for_configured_origins(
    loaded_orthanc: EmbeddedOrthanc, tmp_path: Path
) -> None:
    settings = {
        "auth": "smart",
        "dicomweb_url": loaded_orthanc.dicomweb_url,
        "data_dir": tmp_path,
        "cors_origins": [ORIGIN],
    }
    with serve(settings) as server:
        token_url = server.base_url.removesuffix("/fhir") + "/auth/token"
        allowed = httpx.options(
            token_url,
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == ORIGIN
        refused = httpx.options(
            token_url, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        )
        assert "access-control-allow-origin" not in refused.headers
        answer = httpx.post(token_url, data={"grant_type": "client_credentials"}, headers={"Origin": ORIGIN})
        assert answer.status_code in (400, 401)  # an OAuth error, readable by the app
        assert answer.headers["access-control-allow-origin"] == ORIGIN
