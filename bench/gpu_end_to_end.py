"""Benchmark: N concurrent S-slice studies end to end through the facade's `$analyze`, real Orthanc
included, on a chosen inference backend: the GPU acceptance run of issue 17 (ADR 0037).

    python bench/gpu_end_to_end.py [--studies 50] [--slices 20] [--backend torch --precision bf16]

What it does, in order:
1. Orthanc: `--orthanc-url` (a running one, no auth or --orthanc-user/--orthanc-password) or an
   embedded one on free 127.0.0.1 ports in a temp dir (the Debian `orthanc` and
   `orthanc-dicomweb` binaries, or the carried ones of bench/gpu_kit.sh).
2. Loads N + 1 studies of S real MR slices (Colin27 under fresh UIDs; one for the warm-up).
3. The facade: `--facade-url` (a running one; give `--facade-log` to get the inference split) or
   `python -m fhir_facade serve` as its own process (SQLite in the temp dir, watcher and worklist
   off, SR write-back on as by default) with FACADE_INFERENCE_* from the options below.
4. One untimed warm-up `$analyze`, then all N synchronous `$analyze` POSTs at once
   (httpx.AsyncClient, one connection each).
5. Prints a table and one `RESULT key=value ...` line (parsed by tests/test_bench_gpu.py): wall time,
   studies/hour, p50 and p95 of the POST latency, the inference share of the time (sum of the
   facade's `inference` seconds, i.e. `backend.infer` wall time as Analyzer.analyze logs it, over
   the sum of the end-to-end latencies), what the model ran on, and whether p95 met the target.
   `--json PATH` writes the same figures as JSON.

Backends: `onnxruntime` (providers from --providers, e.g. CUDAExecutionProvider,CPUExecutionProvider
where onnxruntime-gpu is installed), `torch` (onnx2torch; --torch-device, --precision) or
`kserve-v2` (--inference-url, e.g. Triton). The exact commands for the GPU machine are in
docs/scaling.md ("GPU acceptance run"). Traffic goes to 127.0.0.1 (or the URLs given) only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.analyze import BRAIN_SLICES, ServerFigures, ServerLog, brain_study, p95, store
from bench.harness import facade_process
from fhir_facade.demo.brain_mri import build_demo_study
from fhir_facade.embedded import EmbeddedOrthanc, free_port

TARGET_P95_S = 0.5
# "Model brain-tumor-vgg16 0.1.1 ready on torch 2.11.0 cuda:0 bf16" (AnalyzeRuntime.start)
READY = re.compile(r"Model (?P<model>\S+) \S+ ready on (?P<providers>[^\n]+)")


@dataclass(frozen=True)
class Figures:
    """What one run measured; `RESULT` prints these."""

    studies: int
    slices: int
    backend: str
    runs_on: str
    workers: int
    load_s: float
    wall_s: float
    studies_per_hour: float
    p50_s: float
    p95_s: float
    max_s: float
    analyzer_p50_s: float
    inference_share: float
    inference_per_slice_ms: float
    target_p95_s: float
    target_met: bool


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--studies", type=int, default=50, help="concurrent studies (default 50)")
    parser.add_argument("--slices", type=int, default=20, help="slices per study (default 20)")
    parser.add_argument("--backend", choices=("onnxruntime", "torch", "kserve-v2"), default="onnxruntime")
    parser.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default="tf32", help="torch")
    parser.add_argument("--torch-device", choices=("auto", "cuda", "cpu"), default="auto", help="torch")
    parser.add_argument("--device-id", type=int, default=0, help="CUDA ordinal (torch, ORT CUDA provider)")
    parser.add_argument("--providers", help="onnxruntime: comma-separated execution providers")
    parser.add_argument("--threads", type=int, help="onnxruntime: intra-op threads")
    parser.add_argument("--inference-url", help="kserve-v2: the server's base URL (e.g. Triton's :8000)")
    parser.add_argument(
        "--workers", type=int, help="FACADE_ANALYZE_WORKERS (default: --studies, all run at once)"
    )
    parser.add_argument("--no-sr", action="store_true", help="FACADE_ANALYZE_WRITE_SR=false")
    parser.add_argument("--orthanc-url", help="use this running Orthanc (its REST root) instead of one")
    parser.add_argument("--orthanc-user")
    parser.add_argument("--orthanc-password")
    parser.add_argument("--facade-url", help="use this running facade ([base]/fhir) instead of one")
    parser.add_argument("--facade-log", type=Path, help="with --facade-url: its log file (the split)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds for the whole burst")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    if args.studies < 1 or args.slices < 1:
        parser.error("--studies and --slices must be >= 1")
    if args.backend == "kserve-v2" and not args.inference_url and not args.facade_url:
        parser.error("--backend kserve-v2 needs --inference-url")
    return args


def facade_env(
    args: argparse.Namespace, dicomweb_url: str, orthanc_url: str, data_dir: Path
) -> dict[str, str]:
    """The facade's configuration for this run (FACADE_* only; nothing is inherited)."""
    env = {
        "FACADE_DICOMWEB_URL": dicomweb_url,
        "FACADE_ORTHANC_URL": orthanc_url,
        "FACADE_DATA_DIR": str(data_dir),
        "FACADE_DATABASE_URL": f"sqlite:///{data_dir / 'facade.sqlite3'}",
        "FACADE_ANALYZE_ENABLED": "true",
        "FACADE_ANALYZE_WORKLIST": "false",
        "FACADE_ANALYZE_WRITE_SR": "false" if args.no_sr else "true",
        "FACADE_ANALYZE_WORKERS": str(args.workers or args.studies),
        "FACADE_DICOMWEB_MAX_CONNECTIONS": str(max(20, 2 * (args.workers or args.studies))),
        "FACADE_INFERENCE_BACKEND": args.backend,
        "FACADE_INFERENCE_DEVICE_ID": str(args.device_id),
        "FACADE_INFERENCE_TORCH_DEVICE": args.torch_device,
        "FACADE_INFERENCE_TORCH_PRECISION": args.precision,
        "FACADE_LOG_LEVEL": "INFO",
    }
    if args.providers:
        env["FACADE_INFERENCE_PROVIDERS"] = json.dumps(
            [p.strip() for p in args.providers.split(",") if p.strip()]
        )
    if args.threads:
        env["FACADE_INFERENCE_THREADS"] = str(args.threads)
    if args.inference_url:
        env["FACADE_INFERENCE_URL"] = args.inference_url
    if args.orthanc_user:
        env["FACADE_PACS_USERNAME"] = args.orthanc_user
        env["FACADE_PACS_PASSWORD"] = args.orthanc_password or ""
    return env


def analyze_once(base_url: str, study_uid: str) -> None:
    with httpx.Client(base_url=base_url, timeout=600) as client:
        response = client.post(f"/ImagingStudy/{study_uid}/$analyze")
    if response.status_code != 200 or response.json().get("resourceType") != "DiagnosticReport":
        raise RuntimeError(f"warm-up $analyze of {study_uid}: {response.status_code} {response.text[:500]}")


async def burst(base_url: str, study_uids: Sequence[str], timeout: float) -> tuple[float, list[float]]:
    """Every analysis at once; (wall seconds for all, each POST's latency)."""
    limits = httpx.Limits(max_connections=len(study_uids), max_keepalive_connections=len(study_uids))
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:

        async def one(uid: str) -> float:
            t0 = time.perf_counter()
            response = await client.post(f"/ImagingStudy/{uid}/$analyze")
            seconds = time.perf_counter() - t0
            if response.status_code != 200 or response.json().get("resourceType") != "DiagnosticReport":
                raise RuntimeError(f"$analyze of {uid}: {response.status_code} {response.text[:500]}")
            return seconds

        t0 = time.perf_counter()
        latencies = await asyncio.gather(*(one(uid) for uid in study_uids))
        return time.perf_counter() - t0, list(latencies)


def collect(log: ServerLog | None, expected: int, wait_s: float = 10.0) -> list[ServerFigures]:
    """The facade's "Analyzed study" lines of the burst (they are written just before the answer)."""
    if log is None:
        return []
    figures: list[ServerFigures] = []
    deadline = time.monotonic() + wait_s
    while len(figures) < expected and time.monotonic() < deadline:
        figures.extend(log.new_analyses())
        if len(figures) < expected:
            time.sleep(0.1)
    return figures


def runs_on(log_path: Path | None) -> str:
    if log_path is None or not log_path.exists():
        return "unknown"
    match = READY.search(log_path.read_text(encoding="utf-8", errors="replace"))
    return match["providers"].strip() if match else "unknown"


def summarise(
    args: argparse.Namespace,
    *,
    load_s: float,
    wall_s: float,
    latencies: list[float],
    figures: list[ServerFigures],
    where: str,
) -> Figures:
    complete = len(figures) == len(latencies)
    inference = sum(f.inference_seconds for f in figures)
    share = inference / sum(latencies) if complete and latencies else float("nan")
    slices = sum(f.images for f in figures)
    p95_s = p95(latencies)
    return Figures(
        studies=args.studies,
        slices=args.slices,
        backend=args.backend if args.backend != "torch" else f"torch-{args.precision}",
        runs_on=where,
        workers=args.workers or args.studies,
        load_s=load_s,
        wall_s=wall_s,
        studies_per_hour=3600 * len(latencies) / wall_s,
        p50_s=statistics.median(latencies),
        p95_s=p95_s,
        max_s=max(latencies),
        analyzer_p50_s=statistics.median(f.seconds for f in figures) if complete else float("nan"),
        inference_share=share,
        inference_per_slice_ms=1000 * inference / slices if complete and slices else float("nan"),
        target_p95_s=TARGET_P95_S,
        target_met=p95_s < TARGET_P95_S,
    )


def report(figures: Figures) -> None:
    f = figures
    print(
        f"\n$analyze of {f.studies} different {f.slices}-slice MR studies fired at once; backend"
        f" {f.backend} on {f.runs_on}; FACADE_ANALYZE_WORKERS={f.workers}; studies loaded in {f.load_s:.1f} s"
    )
    print(f"  wall time for all          {f.wall_s:8.3f} s   ({f.studies_per_hour:.0f} studies/hour)")
    print(f"  latency p50 / p95 / max    {f.p50_s:8.3f} / {f.p95_s:.3f} / {f.max_s:.3f} s")
    print(f"  inside Analyzer.analyze    {f.analyzer_p50_s:8.3f} s (median)")
    print(
        f"  inference share            {f.inference_share:8.1%} of the end-to-end time"
        f" ({f.inference_per_slice_ms:.1f} ms of backend.infer wall time per slice, queueing included)"
    )
    print(f"  target p95 < {f.target_p95_s} s:        {'met' if f.target_met else 'NOT met'}")
    fields = " ".join(
        f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={str(value).replace(' ', '_')}"
        for key, value in asdict(f).items()
    )
    print(f"RESULT {fields}", flush=True)


def main(argv: Sequence[str] | None = None) -> Figures:
    args = parse_args(argv)
    template = build_demo_study(min(args.slices, BRAIN_SLICES))
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-gpu-e2e-")))
        if args.orthanc_url:
            orthanc_url = args.orthanc_url.rstrip("/")
            auth = (args.orthanc_user, args.orthanc_password or "") if args.orthanc_user else None
        else:
            orthanc = stack.enter_context(
                EmbeddedOrthanc(
                    tmp / "orthanc", http_port=free_port(), dicom_port=free_port(), http_auth=False
                )
            )
            orthanc_url, auth = orthanc.url, None
        t0 = time.perf_counter()
        uids = []
        for n in range(args.studies + 1):  # the first one is the warm-up
            uid, datasets = brain_study(template, args.slices, f"GPU{n:03d}")
            if auth is None:
                store(orthanc_url, datasets)
            else:
                from fhir_facade.embedded import store_instances

                with httpx.Client(timeout=60, auth=auth) as client:
                    store_instances(client, orthanc_url, datasets)
            uids.append(uid)
        load_s = time.perf_counter() - t0
        warm_up, studies = uids[0], uids[1:]

        log_path: Path | None
        if args.facade_url:
            base_url, log_path = args.facade_url.rstrip("/"), args.facade_log
        else:
            data_dir = tmp / "facade"
            data_dir.mkdir()
            log_path = tmp / "facade.log"
            env = facade_env(args, f"{orthanc_url}/dicom-web", orthanc_url, data_dir)
            server = stack.enter_context(facade_process(env, log_path=log_path, timeout=300))
            base_url = server.base_url
        log = ServerLog(log_path) if log_path is not None else None
        where = runs_on(log_path)
        analyze_once(base_url, warm_up)
        collect(log, 1)
        wall_s, latencies = asyncio.run(burst(base_url, studies, args.timeout))
        figures = collect(log, len(studies))

    result = summarise(args, load_s=load_s, wall_s=wall_s, latencies=latencies, figures=figures, where=where)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=2), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
