"""The upstream FHIR server (HAPI in production) as the sync worker sees it: idempotent writes by
id, and each answer classified as done, retry later, or refused for good.

Writes are `PUT [base]/Type/id` (update-as-create with our id) and `DELETE [base]/Type/id`:
repeating one changes nothing, so a retry after a lost answer never duplicates (ADR 0007).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import httpx

from fhir_facade.config import UpstreamSettings
from fhir_facade.correlation import add_correlation_headers
from fhir_facade.http_dates import retry_after_seconds
from fhir_facade.sync.upstream_auth import SmartAuthError, SmartBackendAuth

__all__ = ["Outcome", "UpstreamAnswer", "UpstreamClient", "UpstreamSettings"]

#: Statuses worth retrying: timeouts, conflicts of concurrent writers, throttling, server trouble.
_TRANSIENT = frozenset({408, 409, 412, 425, 429, 500, 502, 503, 504})


class Outcome(Enum):
    DONE = "done"
    RETRY = "retry"
    REFUSED = "refused"


@dataclass(frozen=True)
class UpstreamAnswer:
    outcome: Outcome
    status: int | None
    detail: str
    retry_after: float | None = None


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After as seconds: delay-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    return retry_after_seconds(response.headers.get("retry-after"))


def classify(response: httpx.Response) -> UpstreamAnswer:
    """Done for 2xx (and 404/410 on DELETE: already gone), retry for transient statuses, refused
    for the rest, with the upstream's OperationOutcome kept as the detail."""
    status = response.status_code
    if 200 <= status < 300:
        return UpstreamAnswer(Outcome.DONE, status, "")
    detail = response.text[:20000] or f"HTTP {status}"
    if status in _TRANSIENT:
        return UpstreamAnswer(Outcome.RETRY, status, detail, _retry_after(response))
    return UpstreamAnswer(Outcome.REFUSED, status, detail)


def _entry_answer(entry: dict[str, Any], response: dict[str, Any]) -> UpstreamAnswer:
    """A batch-response entry's status line ("201 Created") classified like an HTTP answer."""
    try:
        status = int(str(response.get("status", "")).split()[0])
    except (ValueError, IndexError):
        return UpstreamAnswer(Outcome.RETRY, None, f"unreadable entry status {response.get('status')!r}")
    if 200 <= status < 300 or (entry["request"]["method"] == "DELETE" and status in (404, 410)):
        return UpstreamAnswer(Outcome.DONE, status, "")
    detail = json.dumps(response.get("outcome")) if response.get("outcome") else f"HTTP {status}"
    outcome = Outcome.RETRY if status in _TRANSIENT else Outcome.REFUSED
    return UpstreamAnswer(outcome, status, detail)


class UpstreamClient:
    """Synchronous client (the sync worker runs in its own thread or process)."""

    def __init__(self, settings: UpstreamSettings, transport: httpx.BaseTransport | None = None) -> None:
        auth: httpx.Auth | None = None
        headers = {"Accept": "application/fhir+json", "Content-Type": "application/fhir+json"}
        if settings.auth == "basic":
            auth = httpx.BasicAuth(settings.username or "", settings.password or "")
        elif settings.auth == "bearer":
            headers["Authorization"] = f"Bearer {settings.token or ''}"
        elif settings.auth == "smart-backend":
            auth = _smart_backend_auth(settings)
        elif settings.auth != "none":
            raise ValueError(
                f"unsupported upstream auth {settings.auth!r} (none, basic, bearer, smart-backend)"
            )
        self.base_url = settings.base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=settings.timeout,
            headers=headers,
            auth=auth,
            transport=transport,
            # The worker scopes each delivery to the correlation id of the request that wrote it.
            event_hooks={"request": [add_correlation_headers]},
        )

    def close(self) -> None:
        self._http.close()

    def put(self, resource: dict[str, Any]) -> UpstreamAnswer:
        body = {k: v for k, v in resource.items() if k != "meta"}  # upstream keeps its own meta
        return self._send("PUT", f"/{resource['resourceType']}/{resource['id']}", json.dumps(body))

    def delete(self, resource_type: str, resource_id: str) -> UpstreamAnswer:
        answer = self._send("DELETE", f"/{resource_type}/{resource_id}", None)
        if answer.status in (404, 410):
            return UpstreamAnswer(Outcome.DONE, answer.status, "already gone")
        return answer

    def batch(self, entries: list[dict[str, Any]]) -> list[UpstreamAnswer] | UpstreamAnswer:
        """One `batch` Bundle of PUT/DELETE entries (FHIR http.html#transaction): an answer per
        entry, in order; or one answer for the whole request when it failed as a whole."""
        bundle = {"resourceType": "Bundle", "type": "batch", "entry": entries}
        try:
            response = self._http.post("", content=json.dumps(bundle))
        except httpx.TransportError as exc:
            return UpstreamAnswer(Outcome.RETRY, None, f"upstream unreachable: {exc}")
        except SmartAuthError as exc:
            return UpstreamAnswer(Outcome.RETRY, None, f"upstream authorization failed: {exc}")
        answer = classify(response)
        if answer.outcome is not Outcome.DONE:
            return answer
        try:
            results = response.json().get("entry", [])
        except ValueError:
            return UpstreamAnswer(Outcome.RETRY, response.status_code, "batch-response is not JSON")
        if len(results) != len(entries):
            return UpstreamAnswer(
                Outcome.RETRY,
                response.status_code,
                f"batch-response has {len(results)} of {len(entries)} entries",
            )
        return [
            _entry_answer(entry, result.get("response", {}))
            for entry, result in zip(entries, results, strict=True)
        ]

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        response = self._http.get(f"/{resource_type}/{resource_id}", headers={"Cache-Control": "no-cache"})
        if response.status_code != 200:
            return None
        body: dict[str, Any] = response.json()
        return body

    def _send(self, method: str, path: str, content: str | None) -> UpstreamAnswer:
        try:
            response = self._http.request(method, path, content=content)
        except httpx.TransportError as exc:  # includes timeouts
            return UpstreamAnswer(Outcome.RETRY, None, f"upstream unreachable: {exc}")
        except SmartAuthError as exc:  # nothing was written; retry once the token endpoint agrees
            return UpstreamAnswer(Outcome.RETRY, None, f"upstream authorization failed: {exc}")
        return classify(response)


def _smart_backend_auth(settings: UpstreamSettings) -> SmartBackendAuth:
    """SMART Backend Services auth from the settings, naming the first missing one."""
    for name in ("client_id", "private_key_path", "key_id"):
        if not getattr(settings, name):
            raise ValueError(f"upstream auth smart-backend needs {name}")
    assert settings.client_id and settings.private_key_path and settings.key_id
    try:
        pem = Path(settings.private_key_path).read_bytes()
    except OSError as exc:
        raise ValueError(f"private_key_path {str(settings.private_key_path)!r}: {exc.strerror}") from exc
    return SmartBackendAuth(
        settings.token_url,
        settings.client_id,
        pem,
        settings.key_id,
        settings.algorithm,
        settings.scope,
        fhir_base_url=settings.base_url,
    )
