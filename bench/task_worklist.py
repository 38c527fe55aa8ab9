"""Benchmark: Task worklist queries through the facade's HTTP API against the persistent store,
on SQLite and on PostgreSQL, in one run. Each backend gets N realistic Tasks written through
`ResourceStore.create` (validation + index rows, batched in `store.transaction()`), then one facade
process per backend serves the queries; rounds are interleaved over queries and backends.
Prints the insert rate, median and p95 latency per query per backend, and the database sizes.

    .venv/bin/python bench/task_worklist.py [--tasks 10000] [--rounds 50] [--backends sqlite,postgresql]

PostgreSQL: a throwaway database `facade_bench_<random>` on --pg-url's server (dropped at the end).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import facade_process, pg_database
from fhir_facade.embedded import free_port
from fhir_facade.store import ResourceStore, create_store_engine, upgrade
from fhir_facade.watcher.arrival_tasks import ANALYZE_CODE

PATIENTS = 1000
BATCH = 500
SORT = "-priority,authored-on"
QUERIES: list[tuple[str, list[tuple[str, str]]]] = [
    ("status=requested&_count=20", [("status", "requested"), ("_count", "20")]),
    (
        "status=requested&code=analyze&_count=50",
        [("status", "requested"), ("code", "analyze"), ("_count", "50")],
    ),
    ("patient=Patient/<one>&_count=20", [("patient", "Patient/bench-p0042"), ("_count", "20")]),
    (
        "status=requested,in-progress&_count=20&_total=none",
        [("status", "requested,in-progress"), ("_count", "20"), ("_total", "none")],
    ),
    (
        f"status=requested&_sort={SORT}&_count=20",
        [("status", "requested"), ("_sort", SORT), ("_count", "20")],
    ),
]
SORT_QUERY = QUERIES[-1][0]


def make_task(rng: random.Random, n: int, start: datetime) -> dict[str, Any]:
    roll = rng.random()
    status = "requested" if roll < 0.05 else "in-progress" if roll < 0.08 else "completed"
    authored = start + timedelta(seconds=rng.randrange(365 * 24 * 3600))
    priority = rng.choices(["routine", "urgent", "stat"], weights=[80, 15, 5])[0]
    uid = f"1.2.826.0.1.3680043.8.498.77.{n + 1}"
    task: dict[str, Any] = {
        "resourceType": "Task",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
        "status": status,
        "intent": "order",
        "priority": priority,
        "code": {"coding": [ANALYZE_CODE]},
        "focus": {"reference": f"ImagingStudy/{uid}"},
        "for": {"reference": f"Patient/bench-p{rng.randrange(PATIENTS):04d}"},
        "authoredOn": authored.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "description": f"Analyze newly arrived study {uid}",
    }
    if status != "requested":
        modified = authored + timedelta(minutes=rng.randrange(5, 600))
        task["lastModified"] = modified.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if rng.random() < 0.4:
        task["requester"] = {"reference": f"Practitioner/bench-req{rng.randrange(30):02d}"}
    if status != "requested" and rng.random() < 0.7:
        task["owner"] = {"reference": f"Device/bench-ai{rng.randrange(3)}"}
    return task


def load_tasks(url: str, count: int) -> float:
    """Schema + `count` Tasks through the store's write path; returns Tasks per second."""
    engine = create_store_engine(url)
    try:
        upgrade(engine)
        store = ResourceStore(engine)
        rng = random.Random(20261124)
        start = datetime(2025, 11, 24, tzinfo=UTC)
        t0 = time.perf_counter()
        for first in range(0, count, BATCH):
            with store.transaction():
                for n in range(first, min(first + BATCH, count)):
                    store.create(make_task(rng, n, start))
        rate = count / (time.perf_counter() - t0)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            if engine.dialect.name == "sqlite":
                connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
                connection.exec_driver_sql("ANALYZE")
            else:
                connection.execute(text("VACUUM ANALYZE"))
        return rate
    finally:
        engine.dispose()


def database_size(url: str, sqlite_path: Path | None) -> int:
    if sqlite_path is not None:
        return sum(p.stat().st_size for p in sqlite_path.parent.glob(sqlite_path.name + "*"))
    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as connection:
        return int(connection.execute("SELECT pg_database_size(current_database())").fetchone()[0])


@contextmanager
def facade(database_url: str, data_dir: Path) -> Iterator[httpx.Client]:
    env = {
        "FACADE_DATABASE_URL": database_url,
        "FACADE_DATA_DIR": str(data_dir),
        "FACADE_DICOMWEB_URL": f"http://127.0.0.1:{free_port()}/dicom-web",  # nothing listens
    }
    with facade_process(env) as server, httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


def sort_accepted(client: httpx.Client) -> bool:
    """The server applied `_sort` if its self link keeps it (a lenient server drops it)."""
    response = client.get("/Task", params=QUERIES[-1][1])
    if response.status_code != 200:
        return False
    links = {link["relation"]: link["url"] for link in response.json().get("link", [])}
    return "_sort" in links.get("self", "")


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432")
    args = parser.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"sqlite", "postgresql"}
    if unknown:
        parser.error(f"unknown backends: {', '.join(sorted(unknown))}")

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        clients: dict[str, httpx.Client] = {}
        rates: dict[str, float] = {}
        sizes: dict[str, int] = {}
        for backend in backends:
            if backend == "sqlite":
                sqlite_path = tmp / "bench.sqlite3"
                url = f"sqlite:///{sqlite_path}"
            else:
                sqlite_path = None
                url = stack.enter_context(pg_database(args.pg_url))
            print(f"{backend}: inserting {args.tasks} Tasks ...", flush=True)
            rates[backend] = load_tasks(url, args.tasks)
            sizes[backend] = database_size(url, sqlite_path)
            data_dir = tmp / f"data-{backend}"
            data_dir.mkdir()
            clients[backend] = stack.enter_context(facade(url, data_dir))

        sortable = {backend: sort_accepted(client) for backend, client in clients.items()}
        timings: dict[tuple[str, str], list[float]] = {(b, q): [] for b in backends for q, _ in QUERIES}
        totals: dict[tuple[str, str], int | None] = {}
        measured = [
            (b, q, params) for b in backends for q, params in QUERIES if q != SORT_QUERY or sortable[b]
        ]
        for backend, label, params in measured:  # warm-up (connections, caches, query plans)
            for _ in range(3):
                bundle = clients[backend].get("/Task", params=params).raise_for_status().json()
            totals[(backend, label)] = bundle.get("total")
        for _ in range(args.rounds):
            for backend, label, params in measured:
                t0 = time.perf_counter()
                clients[backend].get("/Task", params=params).raise_for_status().json()
                timings[(backend, label)].append((time.perf_counter() - t0) * 1000)

        print(
            f"\n{args.tasks} Tasks, {PATIENTS} patients; {args.rounds} rounds, interleaved; "
            "ms through HTTP (median / p95)"
        )
        header = f"{'query':<62}" + "".join(
            f" {b + ' med':>15} {b + ' p95':>15} {'total':>6}" for b in backends
        )
        print(header)
        for label, _ in QUERIES:
            row = f"{'Task?' + label:<62}"
            for backend in backends:
                values = timings[(backend, label)]
                if not values:
                    row += f" {'n/a':>15} {'n/a':>15} {'':>6}"
                    continue
                total = totals.get((backend, label))
                row += (
                    f" {statistics.median(values):>15.1f} {p95(values):>15.1f}"
                    f" {'-' if total is None else total:>6}"
                )
            print(row)
        print()
        for backend in backends:
            print(
                f"{backend}: insert {rates[backend]:.0f} Tasks/s (batches of {BATCH} in store.transaction()),"
                f" database {sizes[backend] / 2**20:.1f} MiB, _sort accepted: {sortable[backend]}"
            )


if __name__ == "__main__":
    main()
