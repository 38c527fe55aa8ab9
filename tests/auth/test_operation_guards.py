"""The sync administration operations concern every patient's data: they need a user/ or system/
scope on all types, never a patient/ one."""

from __future__ import annotations

import httpx

from fhir_facade.embedded import EmbeddedOrthanc, free_port
from tests.auth.issuer import TestIssuer
from tests.conftest import ok_json, outcome, serve


def test_sync_status_and_replay_need_all_type_scopes(loaded_orthanc: EmbeddedOrthanc) -> None:
    port = free_port()
    issuer = TestIssuer(audience=f"http://127.0.0.1:{port}/fhir")
    settings = {
        **issuer.facade_settings,
        "dicomweb_url": loaded_orthanc.dicomweb_url,
        "fhir_upstream_url": f"http://127.0.0.1:{free_port()}/fhir",  # nobody there: the queue just waits
        "audit_enabled": False,
    }
    try:
        with serve(settings, port=port) as server, httpx.Client(base_url=server.base_url, timeout=30) as http:
            assert http.get("$sync-status").status_code == 401
            patient = issuer.headers("launch/patient patient/*.cruds", patient="P-1001")
            refused = http.get("$sync-status", headers=patient)
            outcome(refused, 403, "forbidden")
            assert 'scope="system/*.rs"' in refused.headers["www-authenticate"]
            outcome(http.get("$sync-status", headers=issuer.headers("system/Task.rs")), 403, "forbidden")
            status = http.get("$sync-status", headers=issuer.headers("system/*.rs"))
            assert status.status_code == 200, status.text
            outcome(http.post("$sync-replay", headers=issuer.headers("system/*.rs")), 403, "forbidden")
            replay = http.post("$sync-replay", headers=issuer.headers("user/*.cruds"))
            assert replay.status_code == 200, replay.text
            ok_json(replay)
    finally:
        issuer.close()
