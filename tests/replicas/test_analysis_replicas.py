"""Analysis jobs on two replicas sharing one PostgreSQL database and one Orthanc (ADR 0032), with
the real model: one Idempotency-Key sent to both replicas at once runs one analysis; a job whose
replica is SIGKILLed mid-analysis is taken over by the other and produces exactly one report, and
its status URL answers on the other replica; a replica paused (SIGSTOP) mid-analysis whose job was
taken over cannot store a second report when it wakes up (the result's If-Match is refused)."""

from __future__ import annotations

import re
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from fhir_facade.embedded import EmbeddedOrthanc, free_port
from fhir_facade.embedded.orthanc import store_instances
from tests.conftest import ok_json
from tests.dicom_factory import demo_brain_study
from tests.facade_process import wait_for
from tests.replicas.conftest import Replica, ReplicaSet

LEASE_SECONDS = 2.0
#: Enough slices that an analysis takes a few seconds on two CPU cores: time to kill it mid-way.
N_SLICES = 24
STUDY_UID = "1.2.826.0.1.3680043.8.498.32.900"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedOrthanc]:
    folder = tmp_path_factory.mktemp("replica-orthanc")
    with EmbeddedOrthanc(
        folder, http_port=free_port(), dicom_port=free_port(), stable_age=60, http_auth=False
    ) as instance:
        with httpx.Client(timeout=60) as client:
            store_instances(client, instance.url, demo_brain_study(STUDY_UID, "REPLICA-ANALYZE", N_SLICES))
        yield instance


@pytest.fixture(scope="module")
def replicas(
    orthanc: EmbeddedOrthanc, module_postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ReplicaSet]:
    logs = tmp_path_factory.mktemp("replica-logs")
    env = {
        "FACADE_DATABASE_URL": module_postgres_url,
        "FACADE_DICOMWEB_URL": orthanc.dicomweb_url,
        "FACADE_WATCH_STUDIES": "false",
        "FACADE_ANALYZE_ENABLED": "true",
        "FACADE_ANALYZE_POLL_INTERVAL": "0.3",
        "FACADE_ANALYZE_WRITE_SR": "false",
        "FACADE_INFERENCE_THREADS": "1",
        "FACADE_REPLICA_LEASE_SECONDS": str(LEASE_SECONDS),
        "FACADE_DATA_DIR": str(logs / "data"),
    }
    with ReplicaSet(2, env, logs) as started:
        yield started
        print(started.logs())


def reports(base_url: str) -> int:
    bundle = httpx.get(f"{base_url}/DiagnosticReport", params={"_summary": "count"}, timeout=10).json()
    return int(bundle["total"])


def status_url(replica: Replica, task_id: str) -> str:
    return f"{replica.base_url}/$analyze-jobs/{task_id}"


def start_async(replica: Replica, headers: dict[str, str] | None = None) -> str:
    """POST an async $analyze; the Task id."""
    response = httpx.post(
        f"{replica.base_url}/ImagingStudy/{STUDY_UID}/$analyze",
        headers={"Prefer": "respond-async", **(headers or {})},
        timeout=60,
    )
    assert response.status_code == 202, response.text
    return response.headers["X-Analysis-Task"].removeprefix("Task/")


def wait_until_images_analysed(replica: Replica, task_id: str) -> None:
    """Until the job reports at least one image analysed (and is still running)."""

    def some_done() -> bool:
        poll = httpx.get(status_url(replica, task_id), timeout=10)
        assert poll.status_code == 202, f"the job ended before it could be interrupted: {poll.text}"
        return bool(re.match(r"[1-9]\d* of \d+", poll.headers["X-Progress"]))

    wait_for(some_done, timeout=60)


def final_answer(replica: Replica, task_id: str, timeout: float) -> dict[str, Any]:
    """Poll the status URL on `replica` until it stops answering 202; the report."""
    poll = wait_for(
        lambda: (r := httpx.get(status_url(replica, task_id), timeout=10)).status_code != 202 and r,
        timeout=timeout,
    )
    bundle = ok_json(poll)
    report: dict[str, Any] = bundle["entry"][0]["resource"]
    assert report["resourceType"] == "DiagnosticReport"
    return report


def task(replica: Replica, task_id: str) -> dict[str, Any]:
    return ok_json(httpx.get(f"{replica.base_url}/Task/{task_id}", timeout=10))


def test_one_idempotency_key_sent_to_both_replicas_runs_one_analysis(replicas: ReplicaSet) -> None:
    a, b = replicas[0], replicas[1]
    before = reports(a.base_url)
    key = {"Idempotency-Key": f"replicas-{uuid.uuid4().hex}"}
    with ThreadPoolExecutor(6) as pool:
        task_ids = list(pool.map(lambda n: start_async(replicas[n % 2], key), range(6)))
    assert len(set(task_ids)) == 1, task_ids
    report = final_answer(b, task_ids[0], timeout=120)
    assert final_answer(a, task_ids[0], timeout=10)["id"] == report["id"]
    keyed = ok_json(
        httpx.get(f"{a.base_url}/Task", params={"identifier": key["Idempotency-Key"]}, timeout=10)
    )
    assert keyed["total"] == 1
    assert reports(a.base_url) == before + 1


def test_a_paused_replica_whose_job_was_taken_over_stores_no_second_report(replicas: ReplicaSet) -> None:
    a, b = replicas[0], replicas[1]
    before = reports(b.base_url)
    task_id = start_async(a)
    wait_until_images_analysed(a, task_id)
    a.signal(signal.SIGSTOP)  # alive but silent: its lease runs out
    try:
        report = final_answer(b, task_id, timeout=120)
    finally:
        a.signal(signal.SIGCONT)
    # The paused run finishes its images, then its result transaction is refused (If-Match on the
    # Task version it started from) and its end is not recorded either.
    wait_for(lambda: f"Analysis Task {task_id} was taken over" in a.tail(20000), timeout=120)
    assert reports(b.base_url) == before + 1
    finished = task(b, task_id)
    assert finished["status"] == "completed"
    assert finished["output"][0]["valueReference"]["reference"] == f"DiagnosticReport/{report['id']}"


def test_a_job_whose_replica_is_killed_mid_analysis_is_rerun_once_elsewhere(replicas: ReplicaSet) -> None:
    a, b = replicas[0], replicas[1]
    before = reports(b.base_url)
    task_id = start_async(a)
    wait_until_images_analysed(a, task_id)
    a.kill()
    killed = time.monotonic()
    # The status URL answers on the surviving replica: 202 while the job is re-run there, then the report.
    assert httpx.get(status_url(b, task_id), timeout=10).status_code == 202
    report = final_answer(b, task_id, timeout=120)
    assert time.monotonic() - killed < 90
    time.sleep(LEASE_SECONDS + 1)  # any second run would have been claimed and stored by now
    assert reports(b.base_url) == before + 1
    finished = task(b, task_id)
    assert finished["status"] == "completed"
    assert finished["output"][0]["valueReference"]["reference"] == f"DiagnosticReport/{report['id']}"
    # Created in progress (1), taken over (2), completed (3).
    history = ok_json(httpx.get(f"{b.base_url}/Task/{task_id}/_history", timeout=10))
    assert history["total"] == 3
