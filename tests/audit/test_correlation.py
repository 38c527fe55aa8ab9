"""Correlation ids: accepted or replaced at the door, echoed on every answer, and carried to every
service the facade calls on the request's behalf. Observed on the wire: a recording proxy in front
of the real Orthanc, and loopback stand-ins for the KServe v2 model server and the upstream FHIR
server (they record the headers they receive; a real upstream or model server does not say)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from fhir_facade.analyze.inference import KServeV2Backend
from fhir_facade.analyze.manifest import load_manifests
from fhir_facade.correlation import (
    CorrelationIdFilter,
    correlation_scope,
    install_correlation,
    is_valid_correlation_id,
)
from fhir_facade.embedded import EmbeddedOrthanc
from fhir_facade.store import create_store_engine, upgrade
from fhir_facade.sync.outbox_queue import OutboxQueue
from fhir_facade.sync.upstream import UpstreamClient, UpstreamSettings
from fhir_facade.sync.worker import SyncWorker
from tests.audit.conftest import audited, correlation_of, events_with
from tests.conftest import LiveServer, ok_json, outcome
from tests.dicom_factory import CORPUS
from tests.loopback import RecordingServer, fhir_upstream, kserve_model, proxy_to
from tests.outbox_store import store_with_outbox

FHIR_JSON = {"Content-Type": "application/fhir+json"}
STUDY = CORPUS["mueller_mr_brain"]
FRESH = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def orthanc_proxy(loaded_orthanc: EmbeddedOrthanc) -> Iterator[RecordingServer]:
    with RecordingServer(proxy_to(loaded_orthanc.url)) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def facade(orthanc_proxy: RecordingServer) -> Iterator[LiveServer]:
    """The facade reaching Orthanc's DICOMweb through the recording proxy."""
    with audited({"dicomweb_url": f"{orthanc_proxy.url}/dicom-web"}) as server:
        yield server


@pytest.fixture
def fhir(facade: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=facade.base_url, timeout=30) as client:
        yield client


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("abc", True),
        ("trace-1.2_3:4@host/x+y=z", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("", False),
        ("has space", False),
        ("comma,separated", False),
        ('quote"d', False),
        ("line\nbreak", False),
        ("ümlaut", False),
    ],
)
def test_acceptable_ids(value: str, valid: bool) -> None:
    assert is_valid_correlation_id(value) is valid


def test_the_client_id_is_echoed_on_success_and_error(fhir: httpx.Client) -> None:
    response = fhir.get("/Patient", params={"_count": "1"}, headers={"X-Correlation-ID": "client-id-1"})
    ok_json(response)
    assert response.headers["x-correlation-id"] == "client-id-1"
    assert response.headers["x-request-id"] == "client-id-1"
    missing = fhir.get("/Observation/nope", headers={"X-Correlation-ID": "client-id-2"})
    outcome(missing, 404, "not-found")
    assert missing.headers["x-correlation-id"] == "client-id-2"
    unrouted = fhir.get("/NoSuchType", headers={"X-Request-ID": "client-id-3"})
    assert unrouted.status_code == 404
    assert unrouted.headers["x-correlation-id"] == "client-id-3", "X-Request-ID is taken too"
    assert unrouted.headers["x-request-id"] == "client-id-3"


def test_an_invalid_id_is_replaced(fhir: httpx.Client) -> None:
    for bad in ("has space", "x" * 129, "a,b"):
        response = fhir.get("/Observation/nope", headers={"X-Correlation-ID": bad})
        assert response.status_code == 404
        fresh = response.headers["x-correlation-id"]
        assert FRESH.match(fresh), fresh
        assert response.headers["x-request-id"] == fresh
        (event,) = events_with(fhir, fresh)
        assert correlation_of(event) == fresh, "the audit records the id actually used"
    # An unacceptable X-Correlation-ID does not hide an acceptable X-Request-ID.
    response = fhir.get(
        "/Observation/nope", headers={"X-Correlation-ID": "bad id", "X-Request-ID": "good-id"}
    )
    assert response.headers["x-correlation-id"] == "good-id"


def test_without_an_id_each_request_gets_a_fresh_one(fhir: httpx.Client) -> None:
    first = fhir.get("/Observation/nope").headers["x-correlation-id"]
    second = fhir.get("/Observation/nope").headers["x-correlation-id"]
    assert FRESH.match(first) and FRESH.match(second) and first != second


def test_the_id_reaches_orthanc(fhir: httpx.Client, orthanc_proxy: RecordingServer) -> None:
    before = len(orthanc_proxy.requests)
    ok_json(fhir.get(f"/ImagingStudy/{STUDY.study_uid}", headers={"X-Correlation-ID": "to-orthanc-1"}))
    ok_json(
        fhir.get(
            "/ImagingStudy", params={"patient": STUDY.patient_id}, headers={"X-Request-ID": "to-orthanc-2"}
        )
    )
    sent = orthanc_proxy.requests[before:]
    assert sent, "the facade asked Orthanc"
    ids = {request.headers.get("x-correlation-id") for request in sent}
    assert ids == {"to-orthanc-1", "to-orthanc-2"}, [
        (r.path, r.headers.get("x-correlation-id")) for r in sent
    ]
    assert all(r.headers["x-request-id"] == r.headers["x-correlation-id"] for r in sent)


def test_unhandled_errors_carry_the_id_too() -> None:
    """The 500 of an unhandled exception is answered outside every add_middleware layer;
    install_correlation wraps the whole stack so it carries the id as well."""
    app = FastAPI()

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    install_correlation(app)
    install_correlation(app)  # idempotent

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/boom", headers={"X-Correlation-ID": "boom-1"})

    response = asyncio.run(call())
    assert response.status_code == 500
    assert response.headers["x-correlation-id"] == "boom-1"
    assert response.headers.get_list("x-correlation-id") == ["boom-1"]


def test_log_records_carry_the_id() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "message", None, None)
    log_filter = CorrelationIdFilter()
    assert log_filter.filter(record) and record.correlation_id == "-"
    with correlation_scope("log-1"):
        assert log_filter.filter(record) and record.correlation_id == "log-1"


def test_the_id_reaches_the_model_server() -> None:
    manifest = load_manifests()["brain-tumor-vgg16"]
    with RecordingServer(kserve_model(manifest.output.name, len(manifest.output.labels))) as server:
        backend = KServeV2Backend(manifest, server.url)
        try:
            with correlation_scope("to-model-1"):
                backend.warm_up()
            spec = manifest.input
            shape = (
                (1, spec.height, spec.width, spec.channels)
                if spec.layout == "NHWC"
                else (1, spec.channels, spec.height, spec.width)
            )
            with correlation_scope("to-model-2"):
                # The analysis runs inference in a worker thread: the context goes with it.
                asyncio.run(asyncio.to_thread(backend.infer, np.zeros(shape, dtype=np.float32)))
        finally:
            backend.close()
    sent = [(r.method, r.path.rsplit("/", 1)[-1], r.headers.get("x-correlation-id")) for r in server.requests]
    assert sent == [
        ("GET", "ready", "to-model-1"),
        ("POST", "infer", "to-model-1"),
        ("POST", "infer", "to-model-2"),
    ]


def test_the_id_of_the_writing_request_reaches_the_upstream(loaded_orthanc: EmbeddedOrthanc) -> None:
    """The sync runs later, in the background: the id travels in the outbox row. One request
    here, so whether the worker sends the Device and its AuditEvent together (a batch) or apart,
    every upstream request carries that request's id."""
    with (
        RecordingServer(fhir_upstream()) as upstream,
        audited(
            {
                "dicomweb_url": loaded_orthanc.dicomweb_url,
                "fhir_upstream_url": f"{upstream.url}/fhir",
                "sync_poll_interval": 0.05,
            }
        ) as server,
        httpx.Client(base_url=server.base_url, timeout=30) as fhir,
    ):
        body = {"resourceType": "Device", "identifier": [{"system": "urn:test", "value": "correlated"}]}
        headers = {**FHIR_JSON, "X-Correlation-ID": "write-1"}
        created = ok_json(fhir.post("/Device", json=body, headers=headers), 201)

        def sent(marker: bytes) -> list[str | None]:
            return [r.headers.get("x-correlation-id") for r in upstream.requests if marker in r.body]

        deadline = time.monotonic() + 10
        while not (sent(created["id"].encode()) and sent(b'"AuditEvent"')) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(sent(created["id"].encode())) == {"write-1"}, upstream.requests
        (event,) = events_with(fhir, "write-1")
        assert set(sent(event["id"].encode())) == {"write-1"}, "the AuditEvent of the create, too"


def test_a_batch_of_several_requests_gets_one_fresh_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One upstream request, one header value: rows of one request keep its id; a batch Bundle
    mixing requests gets a fresh id, logged with each resource's own id."""
    engine = create_store_engine(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    upgrade(engine)
    store = store_with_outbox(engine)
    device = {"resourceType": "Device", "identifier": [{"system": "urn:test", "value": "d"}]}
    with RecordingServer(fhir_upstream()) as upstream:
        client = UpstreamClient(UpstreamSettings(base_url=f"{upstream.url}/fhir"))

        async def read_virtual(resource_type: str, resource_id: str) -> None:
            return None

        worker = SyncWorker(store, OutboxQueue(engine), client, read_virtual)
        try:
            with correlation_scope("same-request"):
                store.create(device)
                store.create(device)
            asyncio.run(worker.run_once())
            with correlation_scope("request-a"):
                first = store.create(device)
            with correlation_scope("request-b"):
                second = store.create(device)
            with caplog.at_level(logging.INFO, logger="fhir_facade.sync.worker"):
                asyncio.run(worker.run_once())
            with correlation_scope("alone"):
                store.create(device)
            asyncio.run(worker.run_once())
        finally:
            client.close()
            engine.dispose()
    ids = [(r.method, r.headers.get("x-correlation-id")) for r in upstream.requests]
    assert ids[0] == ("POST", "same-request")
    method, mixed = ids[1]
    assert method == "POST" and mixed is not None and FRESH.match(mixed)
    assert ids[2] == ("PUT", "alone")
    (line,) = [r.getMessage() for r in caplog.records if mixed in r.getMessage()]
    assert f"Device/{first['id']} (request-a)" in line and f"Device/{second['id']} (request-b)" in line
