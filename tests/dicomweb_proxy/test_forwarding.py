"""What the proxy sends the PACS and how it relays the answer: no caller credentials, the client's
Accept and query string as sent, answers streamed, PACS failures as 503 outcomes.

The PACS here is a small recording HTTP server where the test must see what arrives (Orthanc does
not show request headers) or must control timing; Orthanc-backed tests are in the other modules.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from fastapi import FastAPI

from fhir_facade.config import Settings
from fhir_facade.dicomweb.outcomes import PACS_ERROR_TRANSLATORS
from fhir_facade.dicomweb_proxy import DicomwebProxyClient, build_dicomweb_proxy_router
from fhir_facade.embedded import free_port
from fhir_facade.fhir.responses import install_error_handlers
from tests.conftest import LiveServer, outcome
from tests.dicom_factory import CORPUS, to_bytes
from tests.dicomweb_proxy.conftest import caller, multipart, new_study, root_of, serve_proxy, stow_body

BOUNDARY = "recorded-boundary"
FAILING_STUDY = "9.9.9"  # the recording PACS answers 500 for this study
SLOW_STUDY = "7.7.7"  # ...and half an answer, then the rest when the test says so, for this one
YAMADA = CORPUS["yamada_mr"].study_uid
FIRST_PART = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + b"A" * 1000 + b"\r\n"
LAST_PART = (
    f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    + b"B" * 1000
    + f"\r\n--{BOUNDARY}--\r\n".encode()
)


@dataclass
class Recorded:
    """What the recording PACS saw, and the gate its slow answer waits on."""

    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    gate_timed_out: bool = False


def recording_pacs(recorded: Recorded) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _record(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            recorded.requests.append(
                (self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            )

        def do_GET(self) -> None:
            self._record()
            if self.path.startswith(f"/dicom-web/studies/{FAILING_STUDY}"):
                self.send_response(500)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path.startswith(f"/dicom-web/studies/{SLOW_STUDY}"):
                # Half an answer, then wait for the test to say it has seen that half.
                self.send_response(200)
                self.send_header(
                    "Content-Type", f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
                )
                self.send_header("Content-Length", str(len(FIRST_PART) + len(LAST_PART)))
                self.end_headers()
                self.wfile.write(FIRST_PART)
                self.wfile.flush()
                recorded.gate_timed_out = not recorded.gate.wait(timeout=10)
                self.wfile.write(LAST_PART)
            else:
                body = b"[]"
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Warning", '299 orthanc "unsupported attribute"')
                self.send_header("Set-Cookie", "pacs-session=1")
                self.end_headers()
                self.wfile.write(body)

        def do_POST(self) -> None:
            self._record()
            body = b"{}"
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def recorded() -> Iterator[tuple[Recorded, httpx.Client]]:
    """A proxy in front of a fresh recording PACS."""
    record = Recorded()
    server = ThreadingHTTPServer(("127.0.0.1", 0), recording_pacs(record))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with (
            serve_proxy(f"http://127.0.0.1:{server.server_port}/dicom-web") as proxy,
            httpx.Client(base_url=root_of(proxy), timeout=30) as client,
        ):
            yield record, client
    finally:
        record.gate.set()
        server.shutdown()
        server.server_close()


CREDENTIALS = {
    "Authorization": "Bearer secret-token-of-the-caller",
    "Cookie": "session=caller-session",
    "X-Forwarded-For": "10.0.0.7",
}


@pytest.mark.parametrize(
    "scope",
    [None, "user/ImagingStudy.cruds", "patient/ImagingStudy.crs"],
    ids=["unrestricted", "user", "patient"],
)
def test_caller_credentials_never_reach_the_pacs(
    recorded: tuple[Recorded, httpx.Client], scope: str | None
) -> None:
    record, client = recorded
    access = {} if scope is None else caller(scope, "P-1")
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    client.get(
        "/studies?PatientName=M*&limit=5&includefield=00081030",
        headers={**CREDENTIALS, **access, "Accept": "application/dicom+json"},
    )
    # (A confined retrieve first asks the PACS about the study, which the recorder does not hold.)
    response = client.get("/studies/1.2.3/series/4.5.6", headers={**CREDENTIALS, **access, "Accept": accept})
    assert response.status_code == (404 if scope == "patient/ImagingStudy.crs" else 200)
    # An instance of another patient than the confined caller's: stored for the others.
    instance = to_bytes(new_study("P-2")[0])
    sent, content_type = multipart([instance])
    client.post("/studies", content=sent, headers={**CREDENTIALS, **access, "Content-Type": content_type})
    # Confined: the search, the retrieve's ownership query, and no store (another patient's instance).
    assert len(record.requests) == (2 if scope == "patient/ImagingStudy.crs" else 3)
    for _method, _path, headers, _body in record.requests:
        assert "authorization" not in headers
        assert "cookie" not in headers
        assert "x-forwarded-for" not in headers
        assert not any(name.startswith("x-test") for name in headers)
    if scope is None:
        (search, retrieve, store) = record.requests
        assert search[1] == "/dicom-web/studies?PatientName=M*&limit=5&includefield=00081030"
        assert search[2]["accept"] == "application/dicom+json"
        assert retrieve[1] == "/dicom-web/studies/1.2.3/series/4.5.6"
        assert retrieve[2]["accept"] == accept
        # Not the client's bytes: the part re-encoded under a boundary of the proxy's own.
        media_type, boundary = store[2]["content-type"].split("; boundary=")
        assert media_type == 'multipart/related; type="application/dicom"'
        assert boundary not in content_type and len(boundary) >= 32
        assert store[0] == "POST" and store[3] == (
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + instance
            + f"\r\n--{boundary}--\r\n".encode()
        )
        assert store[3] != sent and int(store[2]["content-length"]) == len(store[3])


def test_confined_search_query_sent_to_the_pacs(recorded: tuple[Recorded, httpx.Client]) -> None:
    record, client = recorded
    response = client.get(
        "/studies?PatientID=OTHER&PatientName=M%C3%BC*&00100020=*&IssuerOfPatientID=X&limit=5",
        headers=caller("patient/ImagingStudy.rs", "P-1001"),
    )
    assert response.status_code == 200
    assert response.json() == []
    (search,) = record.requests
    # The client's other keys byte for byte; its patient keys replaced by ours, last.
    assert search[1] == (
        "/dicom-web/studies?PatientName=M%C3%BC*&limit=5&PatientID=P-1001"
        "&includefield=00100020&includefield=00100021"
    )
    assert response.headers["warning"] == '299 orthanc "unsupported attribute"'


def test_pacs_headers_are_filtered(recorded: tuple[Recorded, httpx.Client]) -> None:
    _record, client = recorded
    response = client.get("/studies")
    assert response.headers["warning"] == '299 orthanc "unsupported attribute"'
    assert response.headers["content-type"] == "application/dicom+json"
    assert "set-cookie" not in response.headers


def test_retrieve_is_streamed_not_buffered(recorded: tuple[Recorded, httpx.Client]) -> None:
    """The first part reaches the client while the PACS is still holding back the rest."""
    record, client = recorded
    with client.stream("GET", f"/studies/{SLOW_STUDY}") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].endswith(f"boundary={BOUNDARY}")
        received = b""
        chunks = response.iter_raw()
        while len(received) < len(FIRST_PART):
            received += next(chunks)
        assert not record.gate.is_set()
        record.gate.set()  # only now may the PACS finish
        received += b"".join(chunks)
    assert not record.gate_timed_out
    assert received == FIRST_PART + LAST_PART


def test_unreachable_pacs_is_503() -> None:
    pacs_port = free_port()
    with (
        serve_proxy(f"http://127.0.0.1:{pacs_port}/dicom-web") as proxy,
        httpx.Client(base_url=root_of(proxy), timeout=30) as client,
    ):
        confined = caller("patient/ImagingStudy.crs", "P-1001")
        body, content_type = stow_body(new_study("P-1001")[:1])
        responses = [
            client.get("/studies"),
            client.get("/studies", headers=confined),
            client.get("/studies/1.2.3/metadata"),
            client.get("/studies/1.2.3/metadata", headers=confined),
            client.post("/studies", content=body, headers={"Content-Type": content_type}),
        ]
    for response in responses:
        body = outcome(response, 503, "transient")
        assert body["issue"][0]["details"]["coding"][0]["code"] == "dicom_service_unavailable"
        assert response.headers["retry-after"] == "5"
        assert str(pacs_port) not in response.text  # the PACS's address stays inside (ADR 0016)


def test_pacs_server_error_is_503(recorded: tuple[Recorded, httpx.Client]) -> None:
    _record, client = recorded
    response = client.get(f"/studies/{FAILING_STUDY}/metadata")
    body = outcome(response, 503, "transient")
    assert body["issue"][0]["details"]["coding"][0]["code"] == "dicom_service_unavailable"
    assert client.get("/studies/1.2.3/metadata").status_code == 200  # only that study fails


def test_refusals_are_logged_once_at_info(proxy: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="fhir_facade.dicomweb_proxy"):
        assert (
            proxy.get(
                f"/studies/{YAMADA}/metadata", headers=caller("patient/ImagingStudy.rs", "P-1001")
            ).status_code
            == 404
        )
        assert proxy.get("/studies", headers=caller("patient/Observation.rs", "P-1001")).status_code == 403
        assert (
            proxy.get(
                f"/studies/{YAMADA}/series", headers=caller("patient/ImagingStudy.rs", "P-1001")
            ).status_code
            == 200
        )
    lines = [r for r in caplog.records if r.name.startswith("fhir_facade.dicomweb_proxy")]
    assert [r.levelno for r in lines] == [logging.INFO] * 3
    assert "404" in lines[0].getMessage() and YAMADA in lines[0].getMessage()
    assert "client=test-viewer" in lines[0].getMessage()
    assert "403" in lines[1].getMessage() and "ImagingStudy" in lines[1].getMessage()
    assert "not patient P-1001's" in lines[2].getMessage()


def test_router_without_authentication_fails_closed() -> None:
    """Mounted without the authenticating dependency, the proxy lets nobody through."""
    settings = Settings(dicomweb_url=f"http://127.0.0.1:{free_port()}/dicom-web")
    app = FastAPI()
    install_error_handlers(app, PACS_ERROR_TRANSLATORS)
    app.include_router(build_dicomweb_proxy_router(settings, DicomwebProxyClient.from_settings(settings)))
    with LiveServer(app, free_port()) as server, httpx.Client(timeout=30) as client:
        response = client.get(f"http://127.0.0.1:{server.port}/dicom-web/studies")
    outcome(response, 401, "login")
    assert response.headers["www-authenticate"].startswith("Bearer")
