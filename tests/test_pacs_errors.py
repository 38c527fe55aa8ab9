"""The PACS failing: refused connections and a PACS that accepts but never answers both give a
503 OperationOutcome with `dicom_service_unavailable`, within the configured timeout.

The silent PACS is a real TCP listener that never replies: a fault the real Orthanc cannot be
made to produce on demand.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from fhir_facade.embedded import free_port
from fhir_facade.fhir.errors import FACADE_ISSUE_SYSTEM
from tests.conftest import outcome, serve


def assert_unavailable(response: httpx.Response) -> None:
    body = outcome(response, 503, "transient")
    assert body["issue"][0]["details"]["coding"] == [
        {"system": FACADE_ISSUE_SYSTEM, "code": "dicom_service_unavailable"}
    ]
    assert "Traceback" not in response.text


@pytest.fixture
def silent_pacs() -> Iterator[str]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/dicom-web"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    listener.close()


def test_unreachable_pacs_is_503() -> None:
    pacs_port = free_port()
    with serve({"dicomweb_url": f"http://127.0.0.1:{pacs_port}/dicom-web"}) as server:
        for path in ("/ImagingStudy", "/ImagingStudy/1.2.3", "/Patient/P1", "/Patient"):
            response = httpx.get(server.base_url + path, timeout=10)
            assert_unavailable(response)
            assert str(pacs_port) not in response.text  # the PACS's address stays inside (ADR 0016)


def test_silent_pacs_times_out_as_503_without_hanging(silent_pacs: str) -> None:
    with serve({"dicomweb_url": silent_pacs, "dicomweb_timeout": 1.0}) as server:
        started = time.monotonic()
        response = httpx.get(server.base_url + "/ImagingStudy", timeout=30)
        elapsed = time.monotonic() - started
        assert_unavailable(response)
        # connect and read timeouts are 1 s each; the rest is slack for a loaded CI machine
        assert elapsed < 4.0, f"took {elapsed:.1f} s with a 1 s PACS timeout"
        # The FHIR server itself stays responsive meanwhile.
        assert httpx.get(server.base_url + "/metadata", timeout=5).status_code == 200
