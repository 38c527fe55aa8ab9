"""Shared fixtures: a real Orthanc with the DICOMweb plugin on free ports, loaded with the test
corpus and pydicom's own test files, and the facade served by uvicorn on a free port."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom.data
import pytest
import uvicorn
from fastapi import FastAPI
from fhir.resources.R4B import get_fhir_model_class

from fhir_facade.app import create_app
from fhir_facade.config import Settings
from fhir_facade.embedded import EmbeddedOrthanc, free_port
from fhir_facade.fhir.required_bindings import binding_issues
from tests import dicom_factory

PYDICOM_TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


class LiveServer:
    """The app under uvicorn in a background thread: real HTTP, real lifespan."""

    def __init__(self, app: FastAPI, port: int, options: dict[str, Any] | None = None) -> None:
        """`options`: more uvicorn.Config arguments (e.g. fhir_facade.http_limits.uvicorn_options)."""
        self.app = app
        self.port = port
        self._server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", **(options or {})
            )
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("facade did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def serve(settings_overrides: dict[str, Any], *, port: int | None = None) -> LiveServer:
    """A LiveServer (not started) for settings built from `overrides`, on `port` (default: a free
    one); its SQL store is a fresh SQLite file unless `database_url` is given."""
    port = port or free_port()
    overrides = dict(settings_overrides)
    overrides.setdefault("watch_studies", False)  # tests that watch the feed say so
    overrides.setdefault("analyze_enabled", False)  # tests of $analyze say so (it loads the model)
    if "database_url" not in overrides:
        overrides["database_url"] = f"sqlite:///{tempfile.mkdtemp(prefix='facade-store-')}/store.sqlite3"
    settings = Settings(base_url=f"http://127.0.0.1:{port}/fhir", **overrides)
    return LiveServer(create_app(settings), port)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedOrthanc]:
    instance = EmbeddedOrthanc(
        tmp_path_factory.mktemp("orthanc"),
        http_port=free_port(),
        dicom_port=free_port(),
        stable_age=2,
        http_auth=False,  # loopback only; the credentialed path: tests/embedded/test_pacs_access.py
    )
    with instance:
        yield instance


@pytest.fixture(scope="session")
def loaded_orthanc(orthanc: EmbeddedOrthanc) -> EmbeddedOrthanc:
    """Orthanc holding the standard corpus and every pydicom test file that Orthanc accepts."""
    with httpx.Client(timeout=30) as client:
        for spec in dicom_factory.standard_corpus():
            dicom_factory.upload(client, orthanc.url, dicom_factory.build_study(spec))
        for path in sorted(PYDICOM_TEST_FILES.glob("*.dcm")):
            # Some of pydicom's files are deliberately broken; Orthanc refuses those (400).
            client.post(f"{orthanc.url}/instances", content=path.read_bytes())
    return orthanc


@pytest.fixture(scope="session")
def facade(loaded_orthanc: EmbeddedOrthanc) -> Iterator[LiveServer]:
    with serve(
        {
            "dicomweb_url": loaded_orthanc.dicomweb_url,
            "orthanc_url": loaded_orthanc.url,
            "dicom_timezone": "Europe/Berlin",
            "issuer_systems": {"HOSPITAL-A": "urn:oid:1.2.3.4.5"},
        }
    ) as server:
        yield server


@pytest.fixture
def fhir(facade: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=facade.base_url, timeout=30) as client:
        yield client


def validate(resource: dict[str, Any]) -> Any:
    """Validate any resource (including Bundles and their entries) against FHIR R4B, and the
    stored types (and those in a Bundle) against R4's required bindings (ADR 0015)."""
    model = get_fhir_model_class(resource["resourceType"])
    validated = model.model_validate(resource)
    entries = resource.get("entry", []) if resource["resourceType"] == "Bundle" else []
    for item in (resource, *(e["resource"] for e in entries if "resource" in e)):
        assert binding_issues(item) == [], binding_issues(item)
    return validated


def ok_json(response: httpx.Response, status: int = 200) -> dict[str, Any]:
    """Assert status and FHIR JSON content type; validate and return the body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body: dict[str, Any] = response.json()
    validate(body)
    return body


def outcome(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Assert an OperationOutcome error with this HTTP status and first issue code."""
    body = ok_json(response, status)
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == code, body
    return body
