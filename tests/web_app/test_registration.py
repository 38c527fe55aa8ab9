"""Client `imaging-app` in the built-in authorization server (ADR 0043): registered at every start
from FACADE_BASE_URL, beside whatever the registry file holds, without writing the file; the file's
own `imaging-app` wins."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi.testclient import TestClient

from fhir_facade.app import create_app
from fhir_facade.auth.server.registry import DEMO_CLIENT_ID, create_demo_registry
from fhir_facade.config import Settings
from fhir_facade.web_app import IMAGING_APP_CLIENT_ID, PROFILE_SCOPES
from tests.auth.fixtures.smart_app import pkce_pair

CHALLENGE = pkce_pair()[1]


@contextmanager
def _facade(data: Path, root: str = "http://127.0.0.1:8080", **settings: object) -> Iterator[TestClient]:
    app = create_app(
        Settings(
            base_url=f"{root}/fhir",
            data_dir=data,
            auth="smart",
            watch_studies=False,
            analyze_enabled=False,
            **settings,  # type: ignore[arg-type]
        )
    )
    with TestClient(app, base_url=root) as client:
        yield client


def _authorize(client: TestClient, redirect_uri: str) -> int:
    """The status of the authorization endpoint's answer for imaging-app with this redirect URI:
    200 is the sign-in page, 400 the error page for a client or redirect URI it does not know."""
    response = client.get(
        "/auth/authorize",
        params={
            "response_type": "code",
            "client_id": IMAGING_APP_CLIENT_ID,
            "redirect_uri": redirect_uri,
            "scope": PROFILE_SCOPES["patient"],
            "state": "s",
            "aud": f"{client.base_url}/fhir",
            "code_challenge": CHALLENGE,
            "code_challenge_method": "S256",
        },
        follow_redirects=False,
    )
    return response.status_code


def test_a_registry_written_by_an_earlier_start_gets_the_app_without_an_edit(tmp_path: Path) -> None:
    registry_file = tmp_path / "auth-clients.json"
    create_demo_registry(registry_file)  # what an earlier start (before /app existed) wrote
    before = registry_file.read_bytes()
    with _facade(tmp_path) as client:
        launcher = client.get("/auth/ehr-launch").text
        assert f'value="{IMAGING_APP_CLIENT_ID}"' in launcher
        assert _authorize(client, "http://127.0.0.1:8080/app/index.html") == 200
        assert _authorize(client, "http://127.0.0.1:9000/callback") == 400
    assert registry_file.read_bytes() == before
    assert [c["client_id"] for c in json.loads(before)["clients"]] == [DEMO_CLIENT_ID]


def test_the_urls_follow_the_base_url(tmp_path: Path) -> None:
    with _facade(tmp_path, root="http://127.0.0.1:9443") as client:
        assert _authorize(client, "http://127.0.0.1:9443/app/index.html") == 200
        assert _authorize(client, "http://127.0.0.1:8080/app/index.html") == 400


def test_the_files_own_imaging_app_wins(tmp_path: Path) -> None:
    registry_file = tmp_path / "auth-clients.json"
    registry_file.write_text(
        json.dumps(
            {
                "clients": [
                    {
                        "client_id": IMAGING_APP_CLIENT_ID,
                        "kind": "public",
                        "redirect_uris": ["https://imaging.hospital.example/app/index.html"],
                        "scope": "openid fhirUser launch/patient patient/*.rs",
                    }
                ]
            }
        )
    )
    with _facade(tmp_path, auth_clients_file=registry_file) as client:
        assert _authorize(client, "https://imaging.hospital.example/app/index.html") == 200
        assert _authorize(client, "http://127.0.0.1:8080/app/index.html") == 400
        # No launch_url in the file's entry: the EHR launcher does not offer it.
        assert f'value="{IMAGING_APP_CLIENT_ID}"' not in client.get("/auth/ehr-launch").text
