"""`$sync-status` / `$sync-replay` on a server without an upstream: a clear 501, not the FHIR
router's "Resource type '$sync-status' is not supported" (fhir_facade/sync/unconfigured.py)."""

from __future__ import annotations

import httpx

from tests.conftest import outcome


def test_sync_status_without_upstream_is_501_not_configured(fhir: httpx.Client) -> None:
    body = outcome(fhir.get("/$sync-status"), 501, "not-supported")
    assert "FACADE_FHIR_UPSTREAM_URL" in body["issue"][0]["diagnostics"]
    assert "Resource type" not in body["issue"][0]["diagnostics"]


def test_sync_replay_without_upstream_is_501_not_configured(fhir: httpx.Client) -> None:
    body = outcome(fhir.post("/$sync-replay"), 501, "not-supported")
    assert "FACADE_FHIR_UPSTREAM_URL" in body["issue"][0]["diagnostics"]
