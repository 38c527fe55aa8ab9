"""Benchmark: topic-based Subscription delivery (issue 14): latency and fan-out, in one run.

The facade runs as its own process (`python -m fhir_facade serve`, FACADE_* env) with the change
feed watched on a real embedded Orthanc (StableAge 1 s); the receiver is a real HTTP server in this
process (a thread per connection, HTTP/1.1 keep-alive) on 127.0.0.1 that notes the receipt time of
every notification.

    .venv/bin/python bench/subscriptions.py [--backend sqlite|postgresql] [--reports 200]
        [--rate 20] [--studies 20] [--fanout 1000] [--pg-url postgresql://postgres@127.0.0.1:5432]

Phases, figures:
1. DiagnosticReport commit -> receipt: one id-only Subscription on the diagnostic-report-status
   topic; --reports DiagnosticReports POSTed (status final) at --rate per second; latency per event
   = receipt time minus the event's `timestamp` in the notification (the version's write time in the
   committing transaction, taken from this machine's clock like the receipt): p50, p95, max.
2. StudyArrived known -> receipt: one id-only Subscription on imaging-study-available; --studies
   one-instance MR studies sent to Orthanc (STOW via its REST API) one a second; latency = receipt
   minus the event's timestamp (when the watcher handed the stable study to the facade).
3. Fan-out: --fanout id-only Subscriptions on the diagnostic-report topic (created and handshaken
   first), then one DiagnosticReport: time from sending its POST (and from its commit timestamp) to
   the last of the --fanout notifications received.
Everything runs on 127.0.0.1; the database (SQLite file or throwaway PostgreSQL database), Orthanc
and the facade are removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import facade_process, pg_database
from fhir_facade.embedded import EmbeddedOrthanc, free_port
from tests.dicom_factory import SeriesSpec, StudySpec, build_study, upload

FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
TOPICS = "http://fhir-facade.org/fhir/SubscriptionTopic"
IG = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"


class TimedReceiver:
    """Notes (path, event number, event timestamp, receipt time) for every notification."""

    def __init__(self) -> None:
        self.port = free_port()
        self.lock = threading.Lock()
        self.receipts: list[tuple[str, int, float, float]] = []
        self.handshakes: set[str] = set()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                received = time.time()
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                parameters = body["entry"][0]["resource"]["parameter"]
                kind = next(p["valueCode"] for p in parameters if p["name"] == "type")
                with owner.lock:
                    if kind == "handshake":
                        owner.handshakes.add(self.path)
                    for p in parameters:
                        if p["name"] == "notification-event":
                            parts = {q["name"]: q for q in p["part"]}
                            stamp = datetime.fromisoformat(parts["timestamp"]["valueInstant"]).timestamp()
                            number = int(parts["event-number"]["valueString"])
                            owner.receipts.append((self.path, number, stamp, received))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.daemon_threads = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.request_queue_size = 1024
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, prefix: str) -> list[tuple[str, int, float, float]]:
        with self.lock:
            return [r for r in self.receipts if r[0].startswith(prefix)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def subscription(topic: str, endpoint: str, filters: tuple[str, ...] = ()) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "bench",
        "criteria": f"{TOPICS}/{topic}",
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": f"{IG}/backport-payload-content", "valueCode": "id-only"}]},
        },
    }
    if filters:
        resource["_criteria"] = {
            "extension": [{"url": f"{IG}/backport-filter-criteria", "valueString": f} for f in filters]
        }
    return resource


def report(n: int) -> dict[str, Any]:
    return {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}]},
        "subject": {"reference": f"Patient/BENCH-{n % 50}"},
    }


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.01)


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
    return (
        f"n={len(ordered)} p50={statistics.median(ordered) * 1000:.0f} ms "
        f"p95={p95 * 1000:.0f} ms max={ordered[-1] * 1000:.0f} ms"
    )


@contextmanager
def database(backend: str, pg_url: str) -> Iterator[str]:
    if backend == "postgresql":
        with pg_database(pg_url) as url:
            yield url
    else:
        with tempfile.TemporaryDirectory(prefix="bench-subs-") as folder:
            yield f"sqlite:///{folder}/store.sqlite3"


def create_active(http: httpx.Client, receiver: TimedReceiver, bodies: list[dict[str, Any]]) -> None:
    """Create the subscriptions (8 requests at a time) and wait for every handshake."""
    paths = {"/" + b["channel"]["endpoint"].split("/", 3)[3] for b in bodies}

    def create(body: dict[str, Any]) -> None:
        response = http.post("/Subscription", json=body)
        if response.status_code != 201:
            raise RuntimeError(response.text)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, bodies))
    wait_until(lambda: paths <= receiver.handshakes, 120, "handshakes")

    def all_active() -> bool:  # the server records `active` right after each handshake
        found = http.get("/Subscription", params={"status": "requested", "_summary": "count"}).json()
        return found.get("total") == 0

    wait_until(all_active, 60, "all subscriptions active")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--reports", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--fanout", type=int, default=1000)
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--concurrency", type=int, default=None, help="FACADE_SUBSCRIPTION_CONCURRENCY")
    args = parser.parse_args()

    with ExitStack() as stack:
        receiver = TimedReceiver()
        stack.callback(receiver.close)
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-subs-orthanc-")))
        orthanc = stack.enter_context(
            EmbeddedOrthanc(
                work, http_port=free_port(), dicom_port=free_port(), stable_age=1, http_auth=False
            )
        )
        url = stack.enter_context(database(args.backend, args.pg_url))
        env = {
            "FACADE_DATABASE_URL": url,
            "FACADE_DICOMWEB_URL": orthanc.dicomweb_url,
            "FACADE_ORTHANC_URL": orthanc.url,
            "FACADE_WATCH_STUDIES": "true",
            "FACADE_WATCH_POLL_INTERVAL": "0.2",
            "FACADE_TASK_MODALITIES": "[]",
            "FACADE_SUBSCRIPTION_ENDPOINTS": json.dumps([f"http://127.0.0.1:{receiver.port}/"]),
        }
        if args.concurrency:
            env["FACADE_SUBSCRIPTION_CONCURRENCY"] = str(args.concurrency)
        facade = stack.enter_context(facade_process(env, log_path=work / "facade.log", timeout=120))
        http = stack.enter_context(httpx.Client(base_url=facade.base_url, timeout=60, headers=FHIR_JSON))
        hook = f"http://127.0.0.1:{receiver.port}"
        print(f"backend={args.backend} concurrency={args.concurrency or 'default'} facade={facade.base_url}")

        # 1. DiagnosticReport commit -> receipt.
        create_active(http, receiver, [subscription("diagnostic-report-status", f"{hook}/reports")])
        for n in range(args.reports):
            started = time.monotonic()
            if http.post("/DiagnosticReport", json=report(n)).status_code != 201:
                raise RuntimeError("DiagnosticReport not created")
            time.sleep(max(0.0, 1 / args.rate - (time.monotonic() - started)))
        wait_until(lambda: len(receiver.of("/reports")) >= args.reports, 60, "report notifications")
        latencies = [received - stamp for _, _, stamp, received in receiver.of("/reports")]
        print(f"DiagnosticReport commit -> receipt: {percentiles(latencies)}")

        # 2. StudyArrived known -> receipt.
        create_active(http, receiver, [subscription("imaging-study-available", f"{hook}/studies")])
        with httpx.Client(timeout=30) as pacs:
            for n in range(args.studies):
                spec = StudySpec(
                    patient_id=f"BENCH-S{n}",
                    patient_name="Bench^Study",
                    accession=f"BENCH-{n}",
                    series=[SeriesSpec("MR", "AX", 1, n_instances=1)],
                )
                upload(pacs, orthanc.url, build_study(spec))
                time.sleep(1.0)
        wait_until(lambda: len(receiver.of("/studies")) >= args.studies, 60, "study notifications")
        latencies = [received - stamp for _, _, stamp, received in receiver.of("/studies")]
        print(f"StudyArrived known -> receipt: {percentiles(latencies)}")

        # 3. Fan-out.
        created = time.monotonic()
        bodies = [subscription("diagnostic-report-status", f"{hook}/fan/{n}") for n in range(args.fanout)]
        create_active(http, receiver, bodies)
        print(f"{args.fanout} subscriptions created and handshaken in {time.monotonic() - created:.1f} s")
        sent = time.time()
        if http.post("/DiagnosticReport", json=report(0)).status_code != 201:
            raise RuntimeError("DiagnosticReport not created")
        answered = time.time()
        wait_until(lambda: len(receiver.of("/fan/")) >= args.fanout, 120, "fan-out notifications")
        fan = receiver.of("/fan/")
        last = max(received for *_, received in fan)
        stamp = fan[0][2]
        print(
            f"fan-out to {args.fanout}: POST sent -> last receipt {last - sent:.2f} s; "
            f"commit -> last receipt {last - stamp:.2f} s; POST answered in {answered - sent:.2f} s; "
            f"first receipt {min(r for *_, r in fan) - sent:.2f} s after the POST"
        )


if __name__ == "__main__":
    main()
