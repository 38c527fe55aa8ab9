"""The outbox drained to a real, independent FHIR server (Medplum's fhir-router, tests/upstream_fhir)
on SQLite and PostgreSQL: what the facade stores arrives upstream, with references that resolve
there, exactly once, through outages and refusals, without slowing the facade's own writes."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fhir_facade.embedded import EmbeddedOrthanc, free_port
from tests.conftest import LiveServer, ok_json, serve
from tests.dicom_factory import CORPUS, SeriesSpec, StudySpec, build_study, upload
from tests.facade_process import FacadeProcess
from tests.outbox_store import store_with_outbox
from tests.upstream_fhir_server import UpstreamFhirServer

ADMIN_URL = os.environ.get("FACADE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
FHIR_JSON = {"Content-Type": "application/fhir+json"}
STUDY = CORPUS["mueller_mr_brain"]


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamFhirServer]:
    with UpstreamFhirServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def facade_with_upstream(
    request: pytest.FixtureRequest, loaded_orthanc: EmbeddedOrthanc, upstream: UpstreamFhirServer
) -> Iterator[LiveServer]:
    upstream.reset()
    overrides: dict[str, Any] = {
        "dicomweb_url": loaded_orthanc.dicomweb_url,
        "fhir_upstream_url": upstream.base_url,
        "sync_poll_interval": 0.1,
    }
    name = f"facade_sync_{secrets.token_hex(6)}"
    if request.param == "postgresql":
        admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
        admin.execute(f'CREATE DATABASE "{name}"')
        overrides["database_url"] = f"{ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    try:
        with serve(overrides) as server:
            yield server
    finally:
        if request.param == "postgresql":
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.close()


def eventually(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `check()` held; fails after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.05)
    pytest.fail(f"not within {timeout} s: {what}")


def upstream_get(upstream: UpstreamFhirServer, path: str) -> httpx.Response:
    return httpx.get(f"{upstream.base_url}/{path}", timeout=10)


def marked_upstream(upstream: UpstreamFhirServer, marker: str) -> int:
    """How many Observations with an identifier in system urn:test:<marker> the upstream holds."""
    found = upstream_get(upstream, f"Observation?identifier=urn:test:{marker}|&_count=0&_total=accurate")
    return int(found.json().get("total", -1)) if found.status_code == 200 else -1


def observation(patient: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "preliminary",
        "code": {"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "121071"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "partOf": [{"reference": f"ImagingStudy/{STUDY.study_uid}"}],
        **extra,
    }


def test_a_report_is_readable_upstream_within_2_s_with_resolving_references(
    facade_with_upstream: LiveServer, upstream: UpstreamFhirServer
) -> None:
    with httpx.Client(base_url=facade_with_upstream.base_url, timeout=30) as fhir:
        obs = ok_json(fhir.post("/Observation", json=observation(STUDY.patient_id), headers=FHIR_JSON), 201)
        report = {
            "resourceType": "DiagnosticReport",
            "status": "preliminary",
            "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}]},
            "subject": {"reference": f"Patient/{STUDY.patient_id}"},
            "imagingStudy": [{"reference": f"ImagingStudy/{STUDY.study_uid}"}],
            "result": [{"reference": f"Observation/{obs['id']}"}],
        }
        created = ok_json(fhir.post("/DiagnosticReport", json=report, headers=FHIR_JSON), 201)
    seconds = eventually(
        lambda: upstream_get(upstream, f"DiagnosticReport/{created['id']}").status_code == 200,
        2.0,
        "the DiagnosticReport upstream",
    )
    assert seconds < 2.0
    mirrored = upstream_get(upstream, f"DiagnosticReport/{created['id']}").json()
    for reference in (
        mirrored["subject"]["reference"],
        mirrored["imagingStudy"][0]["reference"],
        mirrored["result"][0]["reference"],
    ):
        assert upstream_get(upstream, reference).status_code == 200, f"{reference} resolves upstream"
    study = upstream_get(upstream, f"ImagingStudy/{STUDY.study_uid}").json()
    assert study["identifier"][0]["value"] == f"urn:oid:{STUDY.study_uid}"


def test_updates_and_deletes_propagate(
    facade_with_upstream: LiveServer, upstream: UpstreamFhirServer
) -> None:
    with httpx.Client(base_url=facade_with_upstream.base_url, timeout=30) as fhir:
        obs = ok_json(fhir.post("/Observation", json=observation(STUDY.patient_id), headers=FHIR_JSON), 201)
        ok_json(fhir.put(f"/Observation/{obs['id']}", json={**obs, "status": "final"}, headers=FHIR_JSON))
        eventually(
            lambda: upstream_get(upstream, f"Observation/{obs['id']}").json().get("status") == "final",
            5,
            "the update upstream",
        )
        assert fhir.delete(f"/Observation/{obs['id']}").status_code in (200, 204)
    eventually(
        lambda: upstream_get(upstream, f"Observation/{obs['id']}").status_code in (404, 410),
        5,
        "the delete upstream",
    )


def test_upstream_down_then_back_all_arrive_exactly_once(
    facade_with_upstream: LiveServer, upstream: UpstreamFhirServer
) -> None:
    upstream.fault("down")
    marker = secrets.token_hex(4)
    with httpx.Client(base_url=facade_with_upstream.base_url, timeout=30) as fhir:
        for n in range(200):
            body = observation(
                STUDY.patient_id, identifier=[{"system": f"urn:test:{marker}", "value": str(n)}]
            )
            assert fhir.post("/Observation", json=body, headers=FHIR_JSON).status_code == 201
        time.sleep(0.5)
        status = ok_json(fhir.get("/$sync-status"))
        pending = next(p["valueInteger"] for p in status["parameter"] if p["name"] == "pending")
        assert pending >= 190, "the writes wait in the outbox while the upstream is down"
        upstream.fault("none")
        before = upstream.stats()

        def all_there() -> bool:
            found = upstream_get(
                upstream, f"Observation?identifier=urn:test:{marker}|&_count=0&_total=accurate"
            )
            return found.status_code == 200 and found.json().get("total") == 200

        eventually(all_there, 90, "200 Observations upstream")
        after = upstream.stats()
        # The backlog goes up in batch Bundles, not one request per resource.
        assert after["by_method"].get("POST", 0) > before["by_method"].get("POST", 0)
        writes = sum(after["by_method"].get(m, 0) - before["by_method"].get(m, 0) for m in ("PUT", "POST"))
        assert writes < 100, f"{writes} write requests for 200 resources"
        status = ok_json(fhir.get("/$sync-status"))
        values = {p["name"]: p.get("valueInteger") for p in status["parameter"]}
        assert values["pending"] == 0 and values["dead"] == 0


def test_a_refused_resource_is_a_dead_letter_and_the_rest_flows(
    facade_with_upstream: LiveServer, upstream: UpstreamFhirServer
) -> None:
    upstream.fault("reject", match="REFUSE-ME")
    with httpx.Client(base_url=facade_with_upstream.base_url, timeout=30) as fhir:
        bad = ok_json(
            fhir.post(
                "/Observation",
                json=observation(STUDY.patient_id, note=[{"text": "REFUSE-ME"}]),
                headers=FHIR_JSON,
            ),
            201,
        )
        good = ok_json(fhir.post("/Observation", json=observation(STUDY.patient_id), headers=FHIR_JSON), 201)
        eventually(
            lambda: upstream_get(upstream, f"Observation/{good['id']}").status_code == 200, 10, "the good one"
        )

        def dead_letter() -> dict[str, Any] | None:
            status = ok_json(fhir.get("/$sync-status"))
            return next((p for p in status["parameter"] if p["name"] == "dead-letter"), None)

        eventually(lambda: dead_letter() is not None, 10, "a dead letter")
        letter = dead_letter()
        assert letter is not None
        parts = {p["name"]: p for p in letter["part"]}
        assert parts["resource"]["valueString"] == f"Observation/{bad['id']}"
        assert "OperationOutcome" in parts["upstream-answer"]["valueString"]
        metrics = httpx.get(facade_with_upstream.base_url.removesuffix("/fhir") + "/metrics").text
        families = {family.name: family for family in text_string_to_metric_families(metrics)}
        assert families["fhir_facade_sync_dead"].type == "gauge"
        assert families["fhir_facade_sync_dead"].samples[0].value == 1
        assert families["fhir_facade_sync_failures"].type == "counter"
        assert {"fhir_facade_sync_pending", "fhir_facade_sync_lag_seconds", "fhir_facade_sync_sent"} <= set(
            families
        )
        # Fixed upstream: a replay delivers it.
        upstream.fault("none")
        replayed = ok_json(fhir.post("/$sync-replay"))
        assert replayed["parameter"][0]["valueInteger"] == 1
    eventually(
        lambda: upstream_get(upstream, f"Observation/{bad['id']}").status_code == 200, 10, "the replay"
    )


def test_a_slow_upstream_does_not_slow_writes(
    facade_with_upstream: LiveServer, upstream: UpstreamFhirServer
) -> None:
    upstream.fault("slow", delay_ms=1500)
    with httpx.Client(base_url=facade_with_upstream.base_url, timeout=30) as fhir:
        ok_json(fhir.post("/Observation", json=observation(STUDY.patient_id), headers=FHIR_JSON), 201)
        time.sleep(0.3)  # the worker is now waiting on the slow upstream
        started = time.perf_counter()
        for _ in range(10):
            ok_json(fhir.post("/Observation", json=observation(STUDY.patient_id), headers=FHIR_JSON), 201)
        elapsed = time.perf_counter() - started
    upstream.fault("none")
    assert elapsed < 1.5, f"10 writes took {elapsed:.2f} s behind a 1.5 s upstream"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh store URL of each kind, for facades run as processes."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.sqlite3'}"
        return
    name = f"facade_sync_{secrets.token_hex(6)}"
    with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{ADMIN_URL.rsplit('/', 1)[0]}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def process_env(
    orthanc: EmbeddedOrthanc, database_url: str, upstream: UpstreamFhirServer, port: int, **extra: str
) -> dict[str, str]:
    """The environment of a facade process that syncs to `upstream` (nothing else running)."""
    return {
        **os.environ,
        "FACADE_DICOMWEB_URL": orthanc.dicomweb_url,
        "FACADE_DATABASE_URL": database_url,
        "FACADE_BASE_URL": f"http://127.0.0.1:{port}/fhir",
        "FACADE_FHIR_UPSTREAM_URL": upstream.base_url,
        "FACADE_SYNC_POLL_INTERVAL": "0.1",
        "FACADE_ANALYZE_ENABLED": "false",
        "FACADE_WATCH_STUDIES": "false",
        "FACADE_LOG_LEVEL": "WARNING",
        **extra,
    }


def test_sigkill_mid_batch_then_restart_delivers_all_exactly_once(
    database_url: str, loaded_orthanc: EmbeddedOrthanc, upstream: UpstreamFhirServer
) -> None:
    """A facade process killed (SIGKILL) while it pushes a backlog: the restarted one delivers
    every resource, and the upstream holds each exactly once."""
    upstream.reset()
    upstream.fault("slow", delay_ms=400)
    port = free_port()
    env = process_env(
        loaded_orthanc,
        database_url,
        upstream,
        port,
        FACADE_SYNC_BATCH_SIZE="10",
        FACADE_SYNC_LEASE_SECONDS="3",  # the killed worker's leased rows come back soon
    )
    facade = FacadeProcess(env, port)
    marker = secrets.token_hex(4)
    facade.start()
    try:
        with httpx.Client(base_url=facade.base_url, timeout=30) as fhir:
            for n in range(60):
                body = observation(
                    STUDY.patient_id, identifier=[{"system": f"urn:test:{marker}", "value": str(n)}]
                )
                assert fhir.post("/Observation", json=body, headers=FHIR_JSON).status_code == 201
        eventually(lambda: upstream.stats()["by_method"].get("POST", 0) >= 1, 20, "a first batch sent")
        facade.kill()  # mid-backlog: a batch is on the wire or its rows are leased
    finally:
        facade.stop()
    upstream.fault("none")

    def count() -> int:
        return marked_upstream(upstream, marker)

    assert count() < 60, "the kill came before the backlog was through"
    restarted = FacadeProcess(env, port)
    restarted.start()
    try:
        eventually(lambda: count() == 60, 120, "all 60 upstream after the restart")

        def drained() -> bool:
            with httpx.Client(base_url=restarted.base_url, timeout=30) as fhir:
                status = ok_json(fhir.get("/$sync-status"))
            values = {p["name"]: p.get("valueInteger") for p in status["parameter"]}
            return values["pending"] == 0 and values["dead"] == 0

        # The rows the killed worker had leased are sent again once their lease expires: by id,
        # so the upstream still holds each resource once.
        eventually(drained, 30, "the outbox drained")
    finally:
        restarted.stop()
    assert count() == 60


def test_mirroring_sends_every_stable_study(
    loaded_orthanc: EmbeddedOrthanc, upstream: UpstreamFhirServer
) -> None:
    """DICOMcast-style: with FACADE_SYNC_MIRROR_STUDIES a study that becomes stable in the PACS is
    upserted upstream as an ImagingStudy though nothing of ours references it."""
    upstream.reset()
    spec = StudySpec(
        patient_id="MIRROR-1",
        patient_name="Spiegel^Mia",
        study_date="20241001",
        study_time="101500",
        series=[SeriesSpec("CT", "HEAD", 1, body_part="HEAD", n_instances=1)],
    )
    overrides = {
        "dicomweb_url": loaded_orthanc.dicomweb_url,
        "orthanc_url": loaded_orthanc.url,
        "watch_studies": True,
        "watch_poll_interval": 0.25,
        "fhir_upstream_url": upstream.base_url,
        "sync_mirror_studies": True,
        "sync_poll_interval": 0.1,
    }
    with serve(overrides):
        with httpx.Client(timeout=30) as client:
            upload(client, loaded_orthanc.url, build_study(spec))
        eventually(
            lambda: upstream_get(upstream, f"ImagingStudy/{spec.study_uid}").status_code == 200,
            30,
            "the new study mirrored upstream",
        )
    mirrored = upstream_get(upstream, f"ImagingStudy/{spec.study_uid}").json()
    assert mirrored["modality"][0]["code"] == "CT"
    assert upstream_get(upstream, mirrored["subject"]["reference"]).status_code == 200


def test_two_sync_processes_share_the_work_without_double_sending(
    database_url: str, loaded_orthanc: EmbeddedOrthanc, upstream: UpstreamFhirServer
) -> None:
    """Scale-out: the server does not sync (FACADE_SYNC_IN_PROCESS=false); two `fhir-facade sync`
    processes drain its outbox together, and no resource is written upstream twice (its upstream
    history has one version)."""
    upstream.reset()
    port = free_port()
    env = process_env(
        loaded_orthanc,
        database_url,
        upstream,
        port,
        FACADE_SYNC_IN_PROCESS="false",
        FACADE_SYNC_BATCH_SIZE="5",
    )
    facade = FacadeProcess(env, port)
    facade.start()
    workers: list[subprocess.Popen[bytes]] = []
    marker = secrets.token_hex(4)
    try:
        with httpx.Client(base_url=facade.base_url, timeout=30) as fhir:
            ids = [
                ok_json(
                    fhir.post(
                        "/Observation",
                        json=observation(
                            STUDY.patient_id, identifier=[{"system": f"urn:test:{marker}", "value": str(n)}]
                        ),
                        headers=FHIR_JSON,
                    ),
                    201,
                )["id"]
                for n in range(40)
            ]
        time.sleep(0.5)
        assert upstream_get(upstream, f"Observation/{ids[0]}").status_code == 404, (
            "the server itself does not sync"
        )
        workers = [subprocess.Popen([sys.executable, "-m", "fhir_facade", "sync"], env=env) for _ in range(2)]

        def count() -> int:
            return marked_upstream(upstream, marker)

        eventually(lambda: count() == 40, 60, "40 Observations upstream")
        for resource_id in ids:
            history = upstream_get(upstream, f"Observation/{resource_id}/_history").json()
            assert len(history.get("entry", [])) == 1, f"Observation/{resource_id} written more than once"
    finally:
        for worker in workers:
            worker.terminate()
            worker.wait(10)
        facade.stop()


def test_a_batch_reads_each_referenced_study_once(tmp_path: Path, upstream: UpstreamFhirServer) -> None:
    """Twenty results of one study in one round: the study is read (from the PACS) once, not per
    result. The reader counts calls and answers a fixed snapshot: the call count is what is tested."""
    import asyncio

    from fhir_facade.store import create_store_engine, upgrade
    from fhir_facade.sync.outbox_queue import OutboxQueue
    from fhir_facade.sync.upstream import UpstreamClient, UpstreamSettings
    from fhir_facade.sync.worker import SyncWorker

    upstream.reset()
    engine = create_store_engine(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    upgrade(engine)
    store = store_with_outbox(engine)
    for _ in range(20):
        store.create(observation(STUDY.patient_id))
    reads: list[tuple[str, str]] = []

    async def read_virtual(resource_type: str, resource_id: str) -> dict[str, Any] | None:
        reads.append((resource_type, resource_id))
        if resource_type == "ImagingStudy":
            return {
                "resourceType": "ImagingStudy",
                "id": resource_id,
                "status": "available",
                "subject": {"reference": f"Patient/{STUDY.patient_id}"},
            }
        return {"resourceType": "Patient", "id": resource_id}

    client = UpstreamClient(UpstreamSettings(base_url=upstream.base_url))
    try:
        worker = SyncWorker(store, OutboxQueue(engine), client, read_virtual, batch_size=50)
        assert asyncio.run(worker.run_once()) == 20
    finally:
        client.close()
        engine.dispose()
    assert sorted(reads) == [("ImagingStudy", STUDY.study_uid), ("Patient", STUDY.patient_id)]
    assert upstream_get(upstream, f"ImagingStudy/{STUDY.study_uid}").status_code == 200
