"""Fixtures of the DICOMweb proxy tests: the proxy router in a bare FastAPI app served over real
HTTP, in front of the real Orthanc, with the caller's Access chosen per request.

The app mounts the router the way the facade does: under a dependency that stores the caller's
Access in `request.state.access` and `current_access`. Here that dependency builds the Access from
two test headers instead of a token: `X-Test-Scope` (absent: `Access.unrestricted()`, as with
FACADE_AUTH=none) and `X-Test-Patient` (the SMART launch patient).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from pydicom.dataset import FileDataset
from pydicom.uid import generate_uid

from fhir_facade.auth.access import Access, current_access
from fhir_facade.auth.scopes import parse_scopes
from fhir_facade.config import Settings
from fhir_facade.dicomweb.outcomes import PACS_ERROR_TRANSLATORS
from fhir_facade.dicomweb_proxy import DicomwebProxyClient, build_dicomweb_proxy_router
from fhir_facade.embedded import EmbeddedOrthanc, free_port
from fhir_facade.fhir.responses import install_error_handlers
from tests.conftest import LiveServer
from tests.dicom_factory import CORPUS_ROOT, SeriesSpec, StudySpec, build_study, to_bytes

SCOPE_HEADER = "X-Test-Scope"
PATIENT_HEADER = "X-Test-Patient"

#: The limit of the proxy in front of the scratch Orthanc, small enough to test 413.
SCRATCH_MAX_STOW_BYTES = 256 * 1024


async def _test_access(request: Request) -> None:
    """Stands in for the authenticating dependency (async, so the context variable it sets is the
    one the handler runs in)."""
    scope = request.headers.get(SCOPE_HEADER)
    if scope is None:
        access = Access.unrestricted()
    else:
        access = Access(
            parse_scopes(scope),
            client_id="test-viewer",
            subject="test-user",
            patient=request.headers.get(PATIENT_HEADER),
        )
    request.state.access = access
    current_access.set(access)


def proxy_app(dicomweb_url: str, *, port: int = 8080, max_stow_bytes: int | None = None) -> FastAPI:
    """A bare app with the proxy router (and its PACS client opened in the lifespan), whose links
    name the proxy at 127.0.0.1:`port`."""
    settings = Settings(
        dicomweb_url=dicomweb_url, dicomweb_timeout=5.0, base_url=f"http://127.0.0.1:{port}/fhir"
    )
    pacs = DicomwebProxyClient.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await pacs.open()
        try:
            yield
        finally:
            await pacs.close()

    app = FastAPI(lifespan=lifespan)
    install_error_handlers(app, PACS_ERROR_TRANSLATORS)
    kwargs = {} if max_stow_bytes is None else {"max_stow_bytes": max_stow_bytes}
    router = build_dicomweb_proxy_router(settings, pacs, **kwargs)
    app.include_router(router, dependencies=[Depends(_test_access)])
    app.state.pacs = pacs
    return app


def serve_proxy(dicomweb_url: str, *, max_stow_bytes: int | None = None) -> LiveServer:
    port = free_port()
    return LiveServer(proxy_app(dicomweb_url, port=port, max_stow_bytes=max_stow_bytes), port)


def root_of(server: LiveServer) -> str:
    """The proxy's DICOMweb root, like Orthanc's `dicomweb_url`."""
    return f"http://127.0.0.1:{server.port}/dicom-web"


def relinked(direct: httpx.Client, proxy: httpx.Client, content: bytes) -> bytes:
    """Orthanc's answer as the proxy gives it: every link to Orthanc's DICOMweb root naming the
    proxy's instead (ADR 0016)."""
    theirs, ours = (str(client.base_url).rstrip("/").encode() for client in (direct, proxy))
    return content.replace(theirs + b"/studies/", ours + b"/studies/")


def caller(scope: str, patient: str | None = None) -> dict[str, str]:
    """The headers that make the test dependency build this caller's Access."""
    headers = {SCOPE_HEADER: scope}
    if patient is not None:
        headers[PATIENT_HEADER] = patient
    return headers


@pytest.fixture(scope="session")
def proxy(loaded_orthanc: EmbeddedOrthanc) -> Iterator[httpx.Client]:
    """A client of the proxy in front of the shared, loaded Orthanc (read-only tests)."""
    with (
        serve_proxy(loaded_orthanc.dicomweb_url) as server,
        httpx.Client(base_url=root_of(server), timeout=30) as client,
    ):
        yield client


@pytest.fixture(scope="session")
def direct(loaded_orthanc: EmbeddedOrthanc) -> Iterator[httpx.Client]:
    """A client of the shared Orthanc's own DICOMweb root, to compare answers with."""
    with httpx.Client(base_url=loaded_orthanc.dicomweb_url, timeout=30) as client:
        yield client


@pytest.fixture(scope="session")
def scratch_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedOrthanc]:
    """An Orthanc of these tests' own, for stores: the shared one's contents are asserted
    elsewhere (e.g. how many studies P-1001 has), so nothing is written there."""
    instance = EmbeddedOrthanc(
        tmp_path_factory.mktemp("orthanc-proxy"),
        http_port=free_port(),
        dicom_port=free_port(),
        http_auth=False,  # loopback only; the credentialed path: tests/embedded/test_pacs_access.py
    )
    with instance:
        yield instance


@pytest.fixture(scope="session")
def scratch_proxy(scratch_orthanc: EmbeddedOrthanc) -> Iterator[httpx.Client]:
    with (
        serve_proxy(scratch_orthanc.dicomweb_url, max_stow_bytes=SCRATCH_MAX_STOW_BYTES) as server,
        httpx.Client(base_url=root_of(server), timeout=30) as client,
    ):
        yield client


@pytest.fixture(scope="session")
def scratch_direct(scratch_orthanc: EmbeddedOrthanc) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=scratch_orthanc.dicomweb_url, timeout=30) as client:
        yield client


def new_study(
    patient_id: str, *, issuer: str | None = None, study_uid: str | None = None
) -> list[FileDataset]:
    """A fresh one-series, two-instance MR study of `patient_id` with UIDs never used before."""
    spec = StudySpec(
        patient_id=patient_id,
        patient_name="Proxy^Test",
        issuer_of_patient_id=issuer,
        study_uid=study_uid or str(generate_uid(CORPUS_ROOT)),
        study_date="20240501",
        description="PROXY TEST",
        series=[SeriesSpec("MR", "AX T1", 1, n_instances=2)],
    )
    return build_study(spec)


def multipart(parts: Sequence[bytes], *, part_type: str = "application/dicom") -> tuple[bytes, str]:
    """A STOW-RS body (RFC 2387 multipart/related) and its Content-Type."""
    boundary = uuid.uuid4().hex
    chunks: list[bytes] = []
    for part in parts:
        chunks += [f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode(), part, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    content_type = f'multipart/related; type="{part_type}"; boundary={boundary}'
    return b"".join(chunks), content_type


def stow_body(datasets: Sequence[FileDataset]) -> tuple[bytes, str]:
    return multipart([to_bytes(ds) for ds in datasets])
