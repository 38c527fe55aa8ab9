"""Property-based fuzzing of every documented route with schemathesis: no 5xx, ever."""

from __future__ import annotations

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.conftest import LiveServer


def test_no_server_errors_on_fuzzed_requests(facade: LiveServer) -> None:
    schema = schemathesis.openapi.from_url(facade.base_url.removesuffix("/fhir") + "/openapi.json")
    failures: list[str] = []
    calls: list[int] = []
    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy())
        def check(case: schemathesis.Case) -> None:
            response = case.call(base_url=facade.base_url.removesuffix("/fhir"), timeout=30)
            calls.append(response.status_code)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} {case.query}: {response.status_code}")
            content_type = response.headers.get("content-type") or [""]
            if isinstance(content_type, list):
                content_type = content_type[0]
            if response.content and not content_type.startswith("application/fhir+json"):
                failures.append(f"{case.method} {case.formatted_path}: content-type {content_type}")

        check()
    assert not failures, "\n".join(failures[:20])
    assert len(calls) >= 100, f"only {len(calls)} fuzzed requests ran"
    assert httpx.get(facade.base_url + "/metadata").status_code == 200
