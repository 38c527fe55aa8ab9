"""Property-based fuzzing of every documented FHIR route with schemathesis, valid and invalid
inputs: no 5xx, ever (but a 501 the operation declares: not configured here); only statuses the
OpenAPI document declares for the operation, every error an OperationOutcome; and no connection
lost: all requests go over one keep-alive connection, which a response may end only by saying
`Connection: close`.

Requests are sent with tests.raw_http (h11 on a socket) rather than requests/httpx, whose pools
silently replace a connection the server dropped and so would hide exactly that failure.
Bounded in time: about a minute on two cores (MAX_EXAMPLES per operation and generation mode).
"""

from __future__ import annotations

import time
from typing import Any

import h11
import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.conftest import LiveServer
from tests.raw_http import RawConnection, RawResponse

#: Examples per operation and generation mode: 20 x 2 modes x ~90 operations, about a minute.
MAX_EXAMPLES = 20
#: Requests stop after this many seconds of fuzzing (the rest of the examples are generated but
#: not sent), so a loaded machine cannot stretch the run much past two minutes.
BUDGET_S = 100.0
#: A connection idle longer than this is replaced before use: the server may close idle ones
#: (uvicorn timeout_keep_alive, 5 s), which is not the failure this test looks for.
IDLE_REUSE_S = 2.0


class OneConnection:
    """The keep-alive connection every fuzzed request goes over (a new one only after `close`)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.raw = RawConnection(port, timeout=30)
        self.last_used = time.monotonic()

    def exchange(self, request: httpx.Request) -> RawResponse:
        if not self.raw.reusable or time.monotonic() - self.last_used > IDLE_REUSE_S:
            self.reconnect()
        target = request.url.raw_path.decode("ascii")
        self.raw.send_head(request.method, target, list(request.headers.multi_items()))
        self.raw.send_body(request.read())
        response = self.raw.read_response()
        self.last_used = time.monotonic()
        return response

    def reconnect(self) -> None:
        self.raw.sock.close()
        self.raw = RawConnection(self.port, timeout=30)

    def close(self) -> None:
        self.raw.sock.close()


def _request(kwargs: dict[str, Any]) -> httpx.Request:
    """The case's request (schemathesis gives requests-style keyword arguments) as an httpx.Request."""
    body: dict[str, Any] = {}
    if "json" in kwargs:
        body["json"] = kwargs["json"]
    elif isinstance(kwargs.get("data"), dict):
        body["data"] = kwargs["data"]
    elif kwargs.get("data") is not None:
        body["content"] = kwargs["data"]
    headers = {k: v for k, v in kwargs.get("headers", {}).items() if k.lower() != "connection"}
    params = kwargs.get("params")
    return httpx.Request(kwargs["method"], kwargs["url"], params=params, headers=headers, **body)


def _declared(responses: dict[str, Any], status: int) -> bool:
    return str(status) in responses or f"{status // 100}XX" in responses or "default" in responses


class Fuzzer:
    """Runs the cases of one operation and generation mode, collecting failures and statuses."""

    def __init__(self, root: str, connection: OneConnection) -> None:
        self.root = root
        self.connection = connection
        self.failures: list[str] = []
        self.statuses: dict[int, int] = {}
        self.deadline = time.monotonic() + BUDGET_S
        self.skipped = 0

    def run(self, operation: Any, mode: GenerationMode, declared: dict[str, Any]) -> None:
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            phases=[Phase.generate],
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case: schemathesis.Case) -> None:
            request = _request(case.as_transport_kwargs(base_url=self.root))
            self.check(f"{operation.method.upper()} {operation.path}", request, declared)

        try:
            check()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # e.g. a string path parameter: every value is valid

    def check(self, where: str, request: httpx.Request, declared: dict[str, Any]) -> None:
        if time.monotonic() > self.deadline:
            self.skipped += 1
            return
        label = f"{where} ({request.url.raw_path.decode()[:120]})"
        try:
            response = self.connection.exchange(request)
        except h11.LocalProtocolError:
            return  # a header value no HTTP client can send (negative data)
        except OSError as exc:  # ConnectionError: reset, or closed without an answer
            self.failures.append(f"{label}: connection lost after the previous request: {exc!r}")
            self.connection.reconnect()
            return
        self.statuses[response.status] = self.statuses.get(response.status, 0) + 1
        if response.status >= 500 and not (response.status == 501 and "501" in declared):
            self.failures.append(f"{label}: {response.status} {response.body[:300]!r}")
        if not _declared(declared, response.status):
            self.failures.append(f"{where}: {response.status} is not in the OpenAPI responses")
        content_type = response.headers.get("content-type", "")
        if response.body and not content_type.startswith("application/fhir+json"):
            self.failures.append(f"{label}: content-type {content_type}")
        if response.status >= 400 and response.json().get("resourceType") != "OperationOutcome":
            self.failures.append(f"{label}: {response.status} without an OperationOutcome")


# ImagingStudy/$import takes DICOM, STOW-RS and zip bodies: fuzzed as opaque bytes (ADR 0038).
schemathesis.serializer.alias(
    ["application/dicom", "multipart/related", "application/zip"], "application/octet-stream"
)


def test_no_server_errors_on_fuzzed_requests(facade: LiveServer) -> None:
    root = facade.base_url.removesuffix("/fhir")
    document = httpx.get(root + "/openapi.json").json()
    schema = schemathesis.openapi.from_dict(document)
    fuzzer = Fuzzer(root, OneConnection(facade.port))
    try:
        for operation in schema.get_all_operations():
            op = operation.ok()
            if not op.path.startswith("/fhir") or ".well-known" in op.path:
                continue  # DICOMweb answers DICOM, not FHIR (tests/dicomweb_proxy); /auth, /metrics
            declared = document["paths"][op.path][op.method.lower()]["responses"]
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzzer.run(op, mode, declared)
    finally:
        fuzzer.connection.close()
    # Server errors and lost connections first, then undeclared statuses, each kind listed once.
    failures = sorted(set(fuzzer.failures), key=lambda f: ("OpenAPI" in f, f))
    assert not failures, "\n".join(failures[:30])
    sent = sum(fuzzer.statuses.values())
    assert sent >= 1000, f"only {sent} fuzzed requests ran ({fuzzer.skipped} over the time budget)"
    assert {200, 400, 404} <= set(fuzzer.statuses), fuzzer.statuses
    assert httpx.get(facade.base_url + "/metadata").status_code == 200
