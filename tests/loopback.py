"""Tiny loopback HTTP servers that record the requests they receive, to observe what the facade
sends: a reverse proxy in front of the real Orthanc, and stand-ins answering as a KServe v2 model
server, an upstream FHIR server, an issuer's JWKS or an introspection endpoint does. Each runs in a
thread on a free port of 127.0.0.1."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import httpx

__all__ = [
    "Answer",
    "Recorded",
    "RecordingServer",
    "fhir_upstream",
    "json_answer",
    "kserve_model",
    "proxy_to",
]

#: What a stand-in answers: status, headers, body.
Answer = tuple[int, dict[str, str], bytes]
Responder = Callable[[str, str, bytes], Answer]

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}
)


def json_answer(body: Any, status: int = 200) -> Answer:
    """A JSON answer for a responder."""
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode()


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]  # names lower-case
    body: bytes


class RecordingServer:
    """Records every request, then answers it with `respond(method, path, body)`."""

    def __init__(self, respond: Responder) -> None:
        self.requests: list[Recorded] = []
        recorded = self.requests

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                recorded.append(Recorded(self.command, self.path, headers, body))
                status, answer_headers, content = respond(self.command, self.path, body)
                self.send_response(status)
                for name, value in answer_headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> RecordingServer:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def proxy_to(target: str) -> Responder:
    """Forward every request to `target` (the same path), answering with its answer."""
    client = httpx.Client(base_url=target, timeout=30)

    def respond(method: str, path: str, body: bytes) -> Answer:
        # Only the request line and body are forwarded: the facade's own headers are what is
        # recorded, and Orthanc needs none of them for QIDO/WADO.
        response = client.request(method, path, content=body or None, headers={"Accept-Encoding": "identity"})
        headers = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_BY_HOP}
        return response.status_code, headers, response.content

    return respond


def kserve_model(output_name: str, labels: int) -> Responder:
    """Answers as a KServe v2 server: ready, and an infer result of zeros for any batch."""

    def respond(method: str, path: str, body: bytes) -> Answer:
        if path.endswith("/ready"):
            return 200, {}, b""
        request = json.loads(body)
        batch = request["inputs"][0]["shape"][0]
        output = {
            "name": output_name,
            "shape": [batch, labels],
            "datatype": "FP32",
            "data": [0.0] * batch * labels,
        }
        return 200, {"Content-Type": "application/json"}, json.dumps({"outputs": [output]}).encode()

    return respond


def fhir_upstream() -> Responder:
    """Answers as a FHIR server accepting every write: 200 to PUT/DELETE, a batch-response with
    one 200 entry per entry of a batch Bundle."""

    def respond(method: str, path: str, body: bytes) -> Answer:
        headers = {"Content-Type": "application/fhir+json"}
        if method == "POST":
            entries = json.loads(body).get("entry", [])
            answer = {
                "resourceType": "Bundle",
                "type": "batch-response",
                "entry": [{"response": {"status": "200 OK"}} for _ in entries],
            }
            return 200, headers, json.dumps(answer).encode()
        if method == "GET":
            return 404, headers, b'{"resourceType":"OperationOutcome","issue":[]}'
        return 200, headers, (body or b"{}")

    return respond
