"""Benchmark: the upstream sync (outbox -> upstream FHIR server) on SQLite and on PostgreSQL.

The upstream is a real, independent FHIR server: Medplum's fhir-router served by
`tests/upstream_fhir/server.mjs` (node_modules from scripts/setup.sh), on a free port of 127.0.0.1.
Per backend the facade runs as its own process (`python -m fhir_facade serve`, FACADE_* env, the
sync worker in-process; no PACS: FACADE_DICOMWEB_URL points at a free port where nothing listens,
and the Observations reference no virtual resource, so nothing is read from it).

    .venv/bin/python bench/sync_upstream.py [--writes 1000] [--concurrency 4]
        [--trickle-rate 20] [--trickle-seconds 10] [--backends sqlite,postgresql]
        [--poll-interval S] [--batch-size N] [--no-baseline]

Per backend:
- baseline (unless --no-baseline): the same burst against a facade with no upstream configured, on
  its own fresh database, for the write rate without a sync worker;
- burst: --writes Observations (each with a unique identifier) POSTed through the facade's HTTP API
  by --concurrency async tasks as fast as it accepts them; then wait until the upstream holds all;
- trickle: --trickle-rate writes/s for --trickle-seconds from one task, paced; lag is then bounded by
  the poll interval (FACADE_SYNC_POLL_INTERVAL), not by a backlog.

Figures per mode: facade writes/s (first request sent to last 201 received); sync resources/s
(first request sent to the newest upstream `meta.lastUpdated`, i.e. the last resource stored
upstream); lag per resource = upstream `meta.lastUpdated` (set by Medplum when it stores the
resource) minus the facade's `meta.lastUpdated` in its 201 answer, both from this machine's
clock: p50, p95, max; and the upstream write requests the sync used (PUT vs POST of batch Bundles,
from the server's /admin/stats). Upstream versions are fetched at the end with searches by
identifier system, paged with `_count`/`_offset` (1,000 a page: Medplum's DEFAULT_MAX_SEARCH_COUNT).

PostgreSQL: throwaway databases `facade_bench_<random>` on --pg-url's server (dropped at the end).
All traffic goes to 127.0.0.1; processes, temp dirs and databases are cleaned up in `finally`/`with`
blocks.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import facade_process, pg_database
from fhir_facade.config import Settings
from fhir_facade.embedded import free_port
from tests.upstream_fhir_server import UPSTREAM_DIR, UpstreamFhirServer

FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
#: Medplum's DEFAULT_MAX_SEARCH_COUNT (@medplum/core): the largest page its server hands out.
UPSTREAM_PAGE = 1000
WARM_UP_WRITES = 20
#: How often the upstream is asked whether everything arrived (each ask is one search there).
ARRIVAL_POLL = 0.2


@dataclass(frozen=True)
class Written:
    """One 201 from the facade: the id it assigned and its meta.lastUpdated (epoch seconds)."""

    resource_id: str
    facade_updated: float


@dataclass
class Phase:
    """One measured write phase and what the upstream made of it."""

    backend: str
    mode: str
    concurrency: int
    started: float = 0.0  # epoch seconds, first request sent
    finished: float = 0.0  # epoch seconds, last answer received
    written: list[Written] = field(default_factory=list)
    failures: int = 0
    first_failure: str = ""
    upstream_updated: dict[str, float] = field(default_factory=dict)  # id -> epoch seconds
    requests: dict[str, int] = field(default_factory=dict)  # upstream method -> count
    baseline_rate: float | None = None  # writes/s of the same burst with no sync worker

    @property
    def write_rate(self) -> float:
        return len(self.written) / (self.finished - self.started)

    @property
    def arrived(self) -> int:
        return sum(1 for w in self.written if w.resource_id in self.upstream_updated)

    @property
    def lags(self) -> list[float]:
        return [
            self.upstream_updated[w.resource_id] - w.facade_updated
            for w in self.written
            if w.resource_id in self.upstream_updated
        ]

    @property
    def sync_rate(self) -> float | None:
        if not self.upstream_updated:
            return None
        return self.arrived / (max(self.upstream_updated.values()) - self.started)

    @property
    def backlog_at_last_write(self) -> int:
        """Resources not yet stored upstream when the last 201 came back."""
        return sum(1 for updated in self.upstream_updated.values() if updated > self.finished)

    @property
    def drain_after_last_write(self) -> float | None:
        if not self.upstream_updated:
            return None
        return max(self.upstream_updated.values()) - self.finished


def epoch(instant: str) -> float:
    """A FHIR instant (`Z` or an offset) as epoch seconds."""
    return datetime.fromisoformat(instant).timestamp()


def observation(system: str, value: int) -> dict[str, Any]:
    """A valid R4 Observation that references nothing virtual (no PACS read when it is synced)."""
    return {
        "resourceType": "Observation",
        "status": "final",
        "identifier": [{"system": system, "value": str(value)}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
        "effectiveDateTime": "2026-01-01T12:00:00Z",
        "valueQuantity": {
            "value": 60 + value % 40,
            "unit": "beats/minute",
            "system": "http://unitsofmeasure.org",
            "code": "/min",
        },
    }


async def _post(client: httpx.AsyncClient, system: str, value: int, phase: Phase) -> None:
    response = await client.post("/Observation", json=observation(system, value), headers=FHIR_JSON)
    if response.status_code != 201:
        phase.failures += 1
        phase.first_failure = phase.first_failure or f"HTTP {response.status_code}: {response.text[:500]}"
        return
    body = response.json()
    phase.written.append(Written(body["id"], epoch(body["meta"]["lastUpdated"])))


async def _burst(base_url: str, system: str, count: int, phase: Phase) -> None:
    limits = httpx.Limits(max_connections=phase.concurrency, max_keepalive_connections=phase.concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        next_value = iter(range(count))

        async def writer() -> None:
            for value in next_value:  # shared iterator: each value is taken by one task
                await _post(client, system, value, phase)

        phase.started = time.time()
        await asyncio.gather(*(writer() for _ in range(phase.concurrency)))
        phase.finished = time.time()


async def _trickle(base_url: str, system: str, rate: float, seconds: float, phase: Phase) -> None:
    """One write every 1/rate s on a fixed schedule (a late write does not shift the next ones)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        loop = asyncio.get_running_loop()
        count = round(rate * seconds)
        phase.started = time.time()
        t0 = loop.time()
        for value in range(count):
            await asyncio.sleep(max(0.0, t0 + value / rate - loop.time()))
            await _post(client, system, value, phase)
        phase.finished = time.time()


def write_burst(base_url: str, system: str, count: int, phase: Phase) -> None:
    asyncio.run(_burst(base_url, system, count, phase))


def write_trickle(base_url: str, system: str, rate: float, seconds: float, phase: Phase) -> None:
    asyncio.run(_trickle(base_url, system, rate, seconds, phase))


def upstream_count(client: httpx.Client, system: str) -> int:
    response = client.get(
        "/Observation", params={"identifier": f"{system}|", "_count": "0", "_total": "accurate"}
    )
    response.raise_for_status()
    return int(response.json().get("total", 0))


def wait_arrived(client: httpx.Client, system: str, expected: int, timeout: float) -> int:
    """Poll the upstream until it holds `expected` resources of `system`; returns how many it has."""
    deadline = time.monotonic() + timeout
    found = upstream_count(client, system)
    while found < expected and time.monotonic() < deadline:
        time.sleep(ARRIVAL_POLL)
        found = upstream_count(client, system)
    return found


def upstream_versions(client: httpx.Client, system: str) -> dict[str, float]:
    """id -> upstream meta.lastUpdated of every Observation of `system`, in pages (no 1,000 reads)."""
    versions: dict[str, float] = {}
    offset = 0
    while True:
        response = client.get(
            "/Observation",
            params={
                "identifier": f"{system}|",
                "_count": str(UPSTREAM_PAGE),
                "_offset": str(offset),
                "_total": "accurate",
            },
        )
        response.raise_for_status()
        bundle = response.json()
        entries = bundle.get("entry", [])
        for entry in entries:
            resource = entry["resource"]
            versions[resource["id"]] = epoch(resource["meta"]["lastUpdated"])
        offset += len(entries)
        if not entries or offset >= int(bundle.get("total", 0)):
            return versions


def write_requests(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    return {
        method: after["by_method"].get(method, 0) - before["by_method"].get(method, 0)
        for method in ("PUT", "POST", "DELETE")
    }


@contextmanager
def facade(database_url: str, data_dir: Path, sync_env: dict[str, str]) -> Iterator[str]:
    """A facade process on a free port; yields its FHIR base URL. `sync_env` adds the
    FACADE_FHIR_UPSTREAM_URL / FACADE_SYNC_* settings (empty: no upstream, no sync worker)."""
    env = {
        "FACADE_DATABASE_URL": database_url,
        "FACADE_DATA_DIR": str(data_dir),
        "FACADE_DICOMWEB_URL": f"http://127.0.0.1:{free_port()}/dicom-web",  # nothing listens
        **sync_env,
    }
    with facade_process(env) as server:
        yield server.base_url


def outbox_status(base_url: str) -> dict[str, Any]:
    """pending / sent / dead from the facade's `$sync-status`."""
    response = httpx.get(f"{base_url}/$sync-status", headers={"Accept": "application/fhir+json"}, timeout=30)
    response.raise_for_status()
    return {p["name"]: p.get("valueInteger") for p in response.json()["parameter"]}


def quantile(values: list[float], q: int) -> float:
    """The q-th percentile (inclusive method)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def measured_phase(
    phase: Phase,
    base_url: str,
    upstream: UpstreamFhirServer,
    upstream_client: httpx.Client,
    system: str,
    write: Any,
    timeout: float,
) -> None:
    """Write (with `write(base_url, system, phase)`), wait for the upstream, fetch its versions."""
    before = upstream.stats()
    write(base_url, system, phase)
    found = wait_arrived(upstream_client, system, len(phase.written), timeout)
    phase.requests = write_requests(before, upstream.stats())  # searches are GETs: not counted
    if found < len(phase.written):
        print(f"  {phase.mode}: only {found} of {len(phase.written)} upstream after {timeout:.0f} s")
    phase.upstream_updated = upstream_versions(upstream_client, system)


def run_backend(
    backend: str,
    args: argparse.Namespace,
    upstream: UpstreamFhirServer,
    stack: ExitStack,
    tmp: Path,
    run_id: str,
) -> list[Phase]:
    def database() -> str:
        if backend == "sqlite":
            return f"sqlite:///{tmp / f'{backend}-{secrets.token_hex(3)}.sqlite3'}"
        return stack.enter_context(pg_database(args.pg_url))

    def data_dir() -> Path:
        path = tmp / f"data-{backend}-{secrets.token_hex(3)}"
        path.mkdir()
        return path

    def system(mode: str) -> str:
        return f"urn:bench:sync:{run_id}:{backend}:{mode}"

    baseline: float | None = None
    if args.baseline:
        print(f"{backend}: baseline burst, no upstream ...", flush=True)
        with facade(database(), data_dir(), {}) as base_url:
            write_burst(base_url, system("warm-up-baseline"), WARM_UP_WRITES, Phase(backend, "warm-up", 1))
            phase = Phase(backend, "baseline", args.concurrency)
            write_burst(base_url, system("baseline"), args.writes, phase)
            baseline = phase.write_rate

    upstream.reset()
    sync_env = {"FACADE_FHIR_UPSTREAM_URL": upstream.base_url}
    if args.poll_interval is not None:
        sync_env["FACADE_SYNC_POLL_INTERVAL"] = str(args.poll_interval)
    if args.batch_size is not None:
        sync_env["FACADE_SYNC_BATCH_SIZE"] = str(args.batch_size)
    phases: list[Phase] = []
    with (
        facade(database(), data_dir(), sync_env) as base_url,
        httpx.Client(base_url=upstream.base_url, timeout=60, headers=FHIR_JSON) as upstream_client,
    ):
        warm_up = Phase(backend, "warm-up", 1)
        write_burst(base_url, system("warm-up"), WARM_UP_WRITES, warm_up)
        wait_arrived(upstream_client, system("warm-up"), len(warm_up.written), args.sync_timeout)

        print(f"{backend}: burst of {args.writes} writes, concurrency {args.concurrency} ...", flush=True)
        burst = Phase(backend, "burst", args.concurrency, baseline_rate=baseline)
        measured_phase(
            burst,
            base_url,
            upstream,
            upstream_client,
            system("burst"),
            lambda url, sys_, phase: write_burst(url, sys_, args.writes, phase),
            args.sync_timeout,
        )
        phases.append(burst)

        print(
            f"{backend}: trickle, {args.trickle_rate:g} writes/s for {args.trickle_seconds:g} s ...",
            flush=True,
        )
        trickle = Phase(backend, "trickle", 1)
        measured_phase(
            trickle,
            base_url,
            upstream,
            upstream_client,
            system("trickle"),
            lambda url, sys_, phase: write_trickle(url, sys_, args.trickle_rate, args.trickle_seconds, phase),
            args.sync_timeout,
        )
        phases.append(trickle)
        status = outbox_status(base_url)
        print(f"{backend}: outbox pending {status['pending']}, sent {status['sent']}, dead {status['dead']}")
    return phases


def print_table(phases: list[Phase], args: argparse.Namespace) -> None:
    defaults = Settings.model_fields
    poll = args.poll_interval if args.poll_interval is not None else defaults["sync_poll_interval"].default
    batch = args.batch_size if args.batch_size is not None else defaults["sync_batch_size"].default
    print(
        f"\nUpstream sync to Medplum fhir-router (in-memory), poll interval {poll:g} s, batch size {batch};"
        " rates from the first request sent; lag = upstream meta.lastUpdated - facade meta.lastUpdated"
    )
    columns = [
        ("backend", 10),
        ("mode", 8),
        ("writes", 6),
        ("conc", 4),
        ("writes/s", 8),
        ("no-sync w/s", 11),
        ("sync res/s", 10),
        ("backlog", 7),
        ("drain s", 7),
        ("upstream", 8),
        ("lag p50 ms", 10),
        ("p95 ms", 7),
        ("max ms", 7),
        ("PUT", 5),
        ("POST", 5),
        ("failed", 6),
    ]
    print(
        " ".join(
            f"{name:>{width}}" if i > 1 else f"{name:<{width}}" for i, (name, width) in enumerate(columns)
        )
    )
    for phase in phases:
        lags = phase.lags
        sync_rate, drain = phase.sync_rate, phase.drain_after_last_write
        cells = [
            phase.backend,
            phase.mode,
            str(len(phase.written)),
            str(phase.concurrency),
            f"{phase.write_rate:.0f}",
            "-" if phase.baseline_rate is None else f"{phase.baseline_rate:.0f}",
            "-" if sync_rate is None else f"{sync_rate:.0f}",
            str(phase.backlog_at_last_write),
            "-" if drain is None else f"{drain:.2f}",
            str(phase.arrived),
            f"{quantile(lags, 50) * 1000:.0f}" if lags else "-",
            f"{quantile(lags, 95) * 1000:.0f}" if lags else "-",
            f"{max(lags) * 1000:.0f}" if lags else "-",
            str(phase.requests.get("PUT", 0)),
            str(phase.requests.get("POST", 0)),
            str(phase.failures),
        ]
        print(
            " ".join(
                f"{c:>{w}}" if i > 1 else f"{c:<{w}}"
                for i, (c, (_, w)) in enumerate(zip(cells, columns, strict=True))
            )
        )
    print(
        "\nwrites/s: facade 201s per second (no-sync w/s: same burst, facade without an upstream);"
        " sync res/s: resources upstream / (newest upstream lastUpdated - first request);"
        " backlog: resources not yet upstream at the last 201;"
        " drain s: newest upstream lastUpdated - last 201; PUT/POST: upstream write requests"
        " (POST = batch Bundles)."
    )
    for phase in phases:
        if phase.first_failure:
            print(f"{phase.backend} {phase.mode}: first failed write: {phase.first_failure}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--trickle-rate", type=float, default=20.0, help="writes/s of the trickle mode")
    parser.add_argument("--trickle-seconds", type=float, default=10.0)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument(
        "--poll-interval", type=float, help="FACADE_SYNC_POLL_INTERVAL (default: the facade's)"
    )
    parser.add_argument("--batch-size", type=int, help="FACADE_SYNC_BATCH_SIZE (default: the facade's)")
    parser.add_argument(
        "--sync-timeout", type=float, default=120.0, help="seconds to wait for the upstream per phase"
    )
    parser.add_argument(
        "--no-baseline", dest="baseline", action="store_false", help="skip the burst without an upstream"
    )
    args = parser.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"sqlite", "postgresql"}
    if unknown:
        parser.error(f"unknown backends: {', '.join(sorted(unknown))}")
    for name in ("writes", "concurrency", "trickle_rate", "trickle_seconds", "sync_timeout"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if shutil.which("node") is None:
        parser.error("node is not installed: run scripts/setup.sh")
    if not (UPSTREAM_DIR / "node_modules" / "@medplum" / "fhir-router" / "package.json").exists():
        parser.error(f"{UPSTREAM_DIR / 'node_modules'} is missing: run scripts/setup.sh")

    run_id = secrets.token_hex(4)
    phases: list[Phase] = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-sync-")))
        upstream_log = tmp / "upstream"
        upstream_log.mkdir()
        upstream = stack.enter_context(UpstreamFhirServer(log_dir=upstream_log))
        for backend in backends:
            phases += run_backend(backend, args, upstream, stack, tmp, run_id)
        print_table(phases, args)


if __name__ == "__main__":
    main()
