"""One change-feed watcher among three replicas, elected by a lease in PostgreSQL (ADR 0032): the
replicas start together on a fresh database (the schema upgrade races and none fails), one holds
the watcher lease; SIGKILL of the holder hands the lease to another within seconds, and every
study that arrives before, during and after the failover gets exactly one arrival Task."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, text

from fhir_facade.embedded import EmbeddedOrthanc, free_port
from tests.dicom_factory import SeriesSpec, StudySpec, build_study, upload
from tests.facade_process import wait_for
from tests.replicas.conftest import ReplicaSet, lease_holder

LEASE_SECONDS = 2.0
WATCHER = "watcher:"


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[EmbeddedOrthanc]:
    """An Orthanc of the test's own: its change log holds only this test's studies."""
    with EmbeddedOrthanc(
        tmp_path / "orthanc", http_port=free_port(), dicom_port=free_port(), stable_age=1, http_auth=False
    ) as instance:
        yield instance


def mr_study(n: int) -> StudySpec:
    return StudySpec(
        patient_id=f"REPLICA-{n}",
        patient_name="Lease^Test",
        study_uid=f"1.2.826.0.1.3680043.8.498.32.{n}",
        accession=f"ACC-REPLICA-{n}",
        study_date="20250301",
        series=[SeriesSpec("MR", "AX T1", 1, n_instances=2)],
    )


def arrival_tasks(base_url: str) -> Counter[str]:
    """How many analysis Tasks each study has."""
    bundle = httpx.get(f"{base_url}/Task", params={"code": "analyze", "_count": 100}, timeout=10).json()
    return Counter(e["resource"]["focus"]["reference"] for e in bundle.get("entry", []))


def test_watcher_fails_over_within_seconds_and_no_study_is_missed_or_doubled(
    orthanc: EmbeddedOrthanc, fresh_postgres_url: str, replica_engine: Engine, tmp_path: Path
) -> None:
    env = {
        "FACADE_DATABASE_URL": fresh_postgres_url,
        "FACADE_DICOMWEB_URL": orthanc.dicomweb_url,
        "FACADE_ORTHANC_URL": orthanc.url,
        "FACADE_WATCH_STUDIES": "true",
        "FACADE_WATCH_POLL_INTERVAL": "0.25",
        "FACADE_ANALYZE_ENABLED": "false",
        "FACADE_REPLICA_LEASE_SECONDS": str(LEASE_SECONDS),
        "FACADE_DATA_DIR": str(tmp_path / "data"),
    }
    studies = [mr_study(n) for n in range(1, 4)]
    focus = [f"ImagingStudy/{s.study_uid}" for s in studies]
    with ReplicaSet(3, env, tmp_path) as replicas, httpx.Client(timeout=30) as pacs:
        try:
            # All three started together on the empty database: one schema, recorded once.
            with replica_engine.connect() as connection:
                versions = connection.execute(text("SELECT version FROM schema_version")).scalars().all()
            assert sorted(versions) == list(range(1, len(versions) + 1))

            leader = wait_for(lambda: lease_holder(replica_engine, WATCHER), timeout=10)
            upload(pacs, orthanc.url, build_study(studies[0]))
            wait_for(lambda: arrival_tasks(replicas[0].base_url)[focus[0]] == 1, timeout=15)

            # The leader dies; a study arrives while nobody (or the next leader) watches.
            survivor = next(r for r in replicas.replicas if r.name != leader)
            replicas.by_name(leader).kill()
            killed = time.monotonic()
            upload(pacs, orthanc.url, build_study(studies[1]))
            successor = wait_for(
                lambda: (holder := lease_holder(replica_engine, WATCHER)) not in (None, leader) and holder,
                timeout=10,
            )
            failover = time.monotonic() - killed
            assert failover <= LEASE_SECONDS + LEASE_SECONDS / 3 + 1.5, f"failover took {failover:.1f} s"
            assert successor != leader

            upload(pacs, orthanc.url, build_study(studies[2]))
            wait_for(lambda: all(arrival_tasks(survivor.base_url)[f] >= 1 for f in focus), timeout=20)
            time.sleep(1.5)  # more polls, by whoever watches: a duplicate would show up now
            counts = arrival_tasks(survivor.base_url)
            assert counts == Counter({f: 1 for f in focus}), counts
        except BaseException:
            print(replicas.logs())
            raise
