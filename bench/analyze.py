"""Benchmark: `POST /fhir/ImagingStudy/{id}/$analyze` on real Colin27 MR slices (the demo brain,
copied under fresh UIDs per study), the real brain-tumor-vgg16 model on ONNX Runtime, a real
embedded Orthanc (free ports on 127.0.0.1) and a facade started as its own process
(`python -m fhir_facade serve`, FACADE_* env, SQLite store in a temp dir, the worklist poller and
the study watcher off, SR write-back on as by default). Three parts, each runs alone:

    .venv/bin/python bench/analyze.py ratio [--slices 20] [--rounds 5]
    .venv/bin/python bench/analyze.py concurrency [--studies 16] [--max-batch 16] [--big-slices 200]
    .venv/bin/python bench/analyze.py memory [--instances 500] [--timeout 600]
    .venv/bin/python bench/analyze.py applicability [--rounds 5] [--step 0]
    .venv/bin/python bench/analyze.py saliency [--rounds 3] [--patch 48] [--stride 24]

Options of every part: `--threads N` (ONNX Runtime intra-op threads, FACADE_INFERENCE_THREADS for
the facade and the same for the bench's own session; default: ONNX Runtime's choice on both sides)
and `--providers CUDAExecutionProvider,CPUExecutionProvider` (FACADE_INFERENCE_PROVIDERS as a JSON
list, and the same list for the bench's own session; default: the facade's default order).

- ratio: one 20-slice series; per round (interleaved) one synchronous `$analyze` timed as wall
  time of the POST (end to end: HTTP, Task, QIDO, WADO-RS per instance, decode, model, SR STOW-RS,
  SQL transaction) and one "pure" pass in this process: `OnnxRuntimeBackend(manifest).infer` over
  the same slices, decoded once up front with `to_model_input`, in batches of
  `manifest.batch_size`. Prints medians, the ratio end to end / pure (target <= 1.25 on CPU) and
  the split from the server's own log line ("Analyzed study ... in X s (inference Y s)").
- concurrency (cross-study batching, ADR 0036), in one run: (a) pure batched inference, slices/s
  of `OnnxRuntimeBackend.infer` in this process over --pure-slices decoded slices in batches of
  --max-batch, measured before and after (b); (b) --studies different 20-slice studies fired at
  once (synchronous `$analyze`, httpx.AsyncClient; FACADE_ANALYZE_WORKERS = --workers), slices/s =
  all slices / wall time of the burst: end to end means the facade's whole work for each study
  (HTTP, Task, QIDO, WADO-RS from the real Orthanc on the same machine, decode, shared batches,
  decision, SR STOW-RS, SQLite transaction), Orthanc's own CPU included; prints the ratio (b) /
  mean of (a) (target >= 0.9); (c) fairness: --small 2-slice studies fired --gap s apart, first
  alone, then --lead s after a --big-slices study; p50/p95 latency of each set.
- memory: one series of --instances MR slices (Colin27 slices cycled, each copy with its own SOP
  Instance UID and InstanceNumber). Reads the facade's VmHWM and VmRSS (/proc/<pid>/status) after
  start-up and one 4-slice warm-up analysis (VmHWM cannot be reset, so the baseline is reported),
  samples VmRSS every 50 ms during the request, and reads VmHWM after it. Target: peak < 1 GiB.

- applicability: the cost of the slice applicability step (ADR 0031). Two facades on one Orthanc,
  one with FACADE_ANALYZE_SLICE_APPLICABILITY=true (the default), one with false; per round
  (interleaved) one synchronous `$analyze` of the demo study (its 24 slices under fresh UIDs; with
  `--step k`, every k-th axial slice of the whole Colin27 volume instead) on each. Prints the
  medians of the POST wall time and of the server's own time, and each one's conclusion.

- saliency: the cost of the key-image saliency map (ADR 0035). Two facades on one Orthanc, both
  with the applicability step off (so the demo study is positive, "meningioma", and a map is
  made), one with FACADE_ANALYZE_SALIENCY=true (--patch, --stride), one with false; per round
  (interleaved) one synchronous `$analyze` of the demo study on each. Prints the medians side by
  side, the ratio on / off (over 2: the setting stays off by default) and the saliency phase.

Every part does one untimed warm-up analysis first. All traffic goes to 127.0.0.1; the facade and
Orthanc are stopped and the temp dirs removed in `finally`/`with` blocks.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from pydicom.dataset import FileDataset
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import facade_process
from fhir_facade.analyze.inference import OnnxRuntimeBackend
from fhir_facade.analyze.manifest import ModelManifest, load_manifests
from fhir_facade.analyze.pixels import to_model_input
from fhir_facade.demo.brain_mri import build_axial_study, build_demo_study
from fhir_facade.embedded import EmbeddedOrthanc, free_port, store_instances

MODEL_ID = "brain-tumor-vgg16"
BRAIN_SLICES = 120  # build_demo_study takes at most the brain's axial range (121 slices of 1 mm)
STORE_CHUNK = 50
WARM_UP_SLICES = 4
GIB = 2**30
# The facade's own figures: Analyzer.analyze logs one line per finished analysis.
ANALYZED = re.compile(
    r"Analyzed study (?P<study>\S+) with \S+: .* from (?P<images>\d+) images(?: \(\d+ excluded\))? "
    r"in (?P<seconds>[\d.]+) s"
    r" \(inference (?P<inference>[\d.]+) s[;)]"
)


@dataclass(frozen=True)
class ServerFigures:
    """One "Analyzed study" log line of the facade."""

    study_uid: str
    images: int
    seconds: float
    inference_seconds: float


class ServerLog:
    """The facade's stderr, captured in a file; `new_analyses` returns the lines since last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def new_analyses(self) -> list[ServerFigures]:
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        # Only consume whole lines: the writer may be in the middle of one.
        end = data.rfind(b"\n") + 1
        self._offset += end
        complete = data[:end].decode("utf-8", "replace")
        return [
            ServerFigures(m["study"], int(m["images"]), float(m["seconds"]), float(m["inference"]))
            for m in ANALYZED.finditer(complete)
        ]


@dataclass
class Facade:
    process: subprocess.Popen[bytes]
    base_url: str
    log: ServerLog


def brain_study(template: Sequence[FileDataset], n: int, label: str) -> tuple[str, list[FileDataset]]:
    """`n` slices cycled from `template`, as one MR series of a new study with fresh UIDs."""
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    datasets: list[FileDataset] = []
    for number in range(1, n + 1):
        ds = copy.deepcopy(template[(number - 1) % len(template)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = number
        ds.PatientID, ds.PatientName = f"BENCH-{label}", f"Bench^{label}"
        ds.AccessionNumber = f"BENCH-{label}"[:16]
        datasets.append(ds)
    return study_uid, datasets


def store(orthanc_url: str, datasets: Sequence[FileDataset]) -> None:
    with httpx.Client(timeout=60) as client:
        for first in range(0, len(datasets), STORE_CHUNK):
            store_instances(client, orthanc_url, datasets[first : first + STORE_CHUNK])


def providers_list(value: str | None) -> list[str] | None:
    return [name.strip() for name in value.split(",") if name.strip()] if value else None


@contextmanager
def facade(
    orthanc: EmbeddedOrthanc,
    workdir: Path,
    args: argparse.Namespace,
    *,
    workers: int = 1,
    analyze_timeout: float | None = None,
    name: str = "facade",
    extra_env: dict[str, str] | None = None,
) -> Iterator[Facade]:
    """The facade as its own process with `$analyze` on; its log (INFO) goes to a file."""
    data_dir = workdir / name
    data_dir.mkdir()
    env = {
        "FACADE_DICOMWEB_URL": orthanc.dicomweb_url,
        "FACADE_ORTHANC_URL": orthanc.url,
        "FACADE_DATA_DIR": str(data_dir),
        "FACADE_DATABASE_URL": f"sqlite:///{data_dir / 'facade.sqlite3'}",
        "FACADE_ANALYZE_ENABLED": "true",
        "FACADE_ANALYZE_WORKLIST": "false",
        "FACADE_ANALYZE_WRITE_SR": "true",
        "FACADE_ANALYZE_WORKERS": str(workers),
        "FACADE_LOG_LEVEL": "INFO",
    }
    if args.threads is not None:
        env["FACADE_INFERENCE_THREADS"] = str(args.threads)
    if providers_list(args.providers) is not None:
        env["FACADE_INFERENCE_PROVIDERS"] = json.dumps(providers_list(args.providers))
    if analyze_timeout is not None:
        env["FACADE_ANALYZE_TIMEOUT"] = str(analyze_timeout)
    env.update(extra_env or {})
    log_path = workdir / f"{name}.log"
    with facade_process(env, log_path=log_path, timeout=180) as server:
        yield Facade(server.process, server.base_url, ServerLog(log_path))


@contextmanager
def orthanc_in_tmp() -> Iterator[tuple[EmbeddedOrthanc, Path, ExitStack]]:
    """A temp dir and Orthanc in it; the caller starts the facade once its studies are stored."""
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-analyze-")))
        orthanc = stack.enter_context(
            EmbeddedOrthanc(tmp / "orthanc", http_port=free_port(), dicom_port=free_port(), http_auth=False)
        )
        yield orthanc, tmp, stack


def analyze(client: httpx.Client, study_uid: str) -> float:
    """One synchronous `$analyze`; wall seconds of the POST. Fails loudly on anything but a report."""
    t0 = time.perf_counter()
    response = client.post(f"/ImagingStudy/{study_uid}/$analyze")
    seconds = time.perf_counter() - t0
    if response.status_code != 200 or response.json().get("resourceType") != "DiagnosticReport":
        raise RuntimeError(f"$analyze of {study_uid}: {response.status_code} {response.text[:500]}")
    return seconds


def p95(values: Sequence[float]) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


def model(args: argparse.Namespace) -> tuple[ModelManifest, OnnxRuntimeBackend]:
    manifest = load_manifests()[MODEL_ID]
    return manifest, OnnxRuntimeBackend(manifest, providers_list(args.providers), args.threads)


# -- parts ------------------------------------------------------------------------------------


def run_ratio(args: argparse.Namespace) -> None:
    manifest, backend = model(args)
    template = build_demo_study(min(args.slices, BRAIN_SLICES))
    study_uid, datasets = brain_study(template, args.slices, "RATIO")
    inputs = np.stack([to_model_input(ds, manifest.input) for ds in datasets])
    size = manifest.batch_size
    batches = [np.ascontiguousarray(inputs[i : i + size]) for i in range(0, len(inputs), size)]

    def pure() -> float:
        t0 = time.perf_counter()
        for batch in batches:
            backend.infer(batch)
        return time.perf_counter() - t0

    with orthanc_in_tmp() as (orthanc, tmp, stack):
        store(orthanc.url, datasets)
        server = stack.enter_context(facade(orthanc, tmp, args))
        client = stack.enter_context(httpx.Client(base_url=server.base_url, timeout=600))
        backend.warm_up()
        analyze(client, study_uid)  # warm-up: connections, lazy imports, first SR
        pure()
        server.log.new_analyses()
        e2e_s, pure_s, figures = [], [], []
        for _ in range(args.rounds):
            e2e_s.append(analyze(client, study_uid))
            figures.extend(server.log.new_analyses())
            pure_s.append(pure())
    backend.close()

    e2e, ort = statistics.median(e2e_s), statistics.median(pure_s)
    print(
        f"\n$analyze of one {args.slices}-slice MR series (Colin27, {len(batches)} batches of <= {size});"
        f" {args.rounds} rounds, interleaved; providers {list(backend.providers)},"
        f" threads {args.threads or 'ORT default'}"
    )
    print(f"{'':<34} {'median s':>9} {'min s':>7} {'max s':>7} {'s/slice':>8}")
    for label, values in (("end to end (POST wall time)", e2e_s), ("pure ONNX Runtime (infer only)", pure_s)):
        median = statistics.median(values)
        print(
            f"{label:<34} {median:>9.3f} {min(values):>7.3f} {max(values):>7.3f} {median / args.slices:>8.3f}"
        )
    print(f"ratio end to end / pure: {e2e / ort:.2f} (target <= 1.25 on CPU)")
    if len(figures) == args.rounds and all(f.images == args.slices for f in figures):
        analysis = statistics.median(f.seconds for f in figures)
        inference = statistics.median(f.inference_seconds for f in figures)
        print("split from the facade's log (medians):")
        print(f"  inside Analyzer.analyze           {analysis:>9.3f} s")
        print(f"    of which backend.infer          {inference:>9.3f} s  (vs pure {ort:.3f} s)")
        print(f"    fetch + decode + SR + store     {analysis - inference:>9.3f} s")
        print(f"  outside it (HTTP, Task, waiting)  {e2e - analysis:>9.3f} s")
    else:
        print(f"(split not available: {len(figures)} log lines for {args.rounds} rounds)")


async def fire(base_url: str, study_uids: Sequence[str]) -> tuple[float, list[float]]:
    """All analyses at once; (wall seconds for all, latency of each)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=900) as client:
        t0 = time.perf_counter()
        latencies = await asyncio.gather(*(post_analyze(client, uid) for uid in study_uids))
        return time.perf_counter() - t0, list(latencies)


async def post_analyze(client: httpx.AsyncClient, uid: str) -> float:
    """One synchronous `$analyze` over `client`; its wall seconds."""
    t0 = time.perf_counter()
    response = await client.post(f"/ImagingStudy/{uid}/$analyze")
    if response.status_code != 200:
        raise RuntimeError(f"$analyze of {uid}: {response.status_code} {response.text[:500]}")
    return time.perf_counter() - t0


async def staggered(
    base_url: str, small: Sequence[str], gap: float, big: str | None, lead: float
) -> tuple[list[float], float | None, float]:
    """The small studies fired one every `gap` seconds, `lead` seconds after `big` (if any) was
    fired; (small latencies, big latency, seconds the big one ran past the last small answer)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=900) as client:
        big_task = None
        if big is not None:
            big_task = asyncio.create_task(post_analyze(client, big))
            await asyncio.sleep(lead)
        tasks = []
        for uid in small:
            tasks.append(asyncio.create_task(post_analyze(client, uid)))
            await asyncio.sleep(gap)
        latencies = list(await asyncio.gather(*tasks))
        small_done = time.perf_counter()
        if big_task is None:
            return latencies, None, 0.0
        big_latency = await big_task
        return latencies, big_latency, time.perf_counter() - small_done


def pure_batched(backend: OnnxRuntimeBackend, inputs: np.ndarray, max_batch: int) -> float:
    """Slices/s of `backend.infer` over `inputs` in batches of `max_batch` (the batcher's best case)."""
    batches = [np.ascontiguousarray(inputs[i : i + max_batch]) for i in range(0, len(inputs), max_batch)]
    t0 = time.perf_counter()
    for batch in batches:
        backend.infer(batch)
    return len(inputs) / (time.perf_counter() - t0)


def run_concurrency(args: argparse.Namespace) -> None:
    """(a) pure batched inference, (b) N concurrent analyses end to end, (a) again, then fairness:
    small studies alone and with a big study ahead, all in one run on one machine."""
    manifest, backend = model(args)
    template = build_demo_study(min(max(args.slices, args.pure_slices), BRAIN_SLICES))
    inputs = np.stack(
        [to_model_input(template[i % len(template)], manifest.input) for i in range(args.pure_slices)]
    )
    backend.warm_up()
    pure_batched(backend, inputs[: args.max_batch], args.max_batch)  # warm the batch size too
    with orthanc_in_tmp() as (orthanc, tmp, stack):
        studies = []
        for n in range(args.studies + 1):  # one more for the warm-up
            uid, datasets = brain_study(template, args.slices, f"CONC{n:02d}")
            store(orthanc.url, datasets)
            studies.append(uid)
        small = []
        for n in range(2 * args.small):  # two sets: alone, then behind the big study
            uid, datasets = brain_study(template, args.small_slices, f"SMALL{n:02d}")
            store(orthanc.url, datasets)
            small.append(uid)
        big_uid, datasets = brain_study(template, args.big_slices, "BIG")
        store(orthanc.url, datasets)
        del datasets
        warm_up, studies = studies[0], studies[1:]
        env = {
            "FACADE_INFERENCE_MAX_BATCH": str(args.max_batch),
            "FACADE_INFERENCE_MAX_WAIT_MS": str(args.max_wait_ms),
        }
        server = stack.enter_context(facade(orthanc, tmp, args, workers=args.workers, extra_env=env))
        with httpx.Client(base_url=server.base_url, timeout=600) as client:
            analyze(client, warm_up)
        server.log.new_analyses()

        load_before = os.getloadavg()[0]
        pure_before = pure_batched(backend, inputs, args.max_batch)
        wall, latencies = asyncio.run(fire(server.base_url, studies))
        figures = server.log.new_analyses()
        pure_after = pure_batched(backend, inputs, args.max_batch)
        load_after = os.getloadavg()[0]

        alone, _, _ = asyncio.run(staggered(server.base_url, small[: args.small], args.gap, None, 0))
        behind, big_latency, big_after = asyncio.run(
            staggered(server.base_url, small[args.small :], args.gap, big_uid, args.lead)
        )
    backend.close()

    pure = statistics.mean([pure_before, pure_after])
    slices = args.studies * args.slices
    e2e = slices / wall
    inference = sum(f.inference_seconds for f in figures)
    print(
        f"\nCross-study batching: max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms,"
        f" FACADE_ANALYZE_WORKERS={args.workers}, providers {list(backend.providers)},"
        f" threads {args.threads or 'ORT default'}"
    )
    print(
        f"(a) pure batched inference ({args.pure_slices} slices, batches of {args.max_batch}, this process):"
        f" {pure_before:.2f} slices/s before, {pure_after:.2f} after, mean {pure:.2f}"
    )
    print(
        f"(b) end to end, {args.studies} different {args.slices}-slice studies fired at once"
        f" (POST $analyze: Task, QIDO, WADO-RS from Orthanc, decode, batches, SR STOW-RS, SQLite):"
    )
    print(
        f"    wall {wall:.2f} s, {e2e:.2f} slices/s, {args.studies / wall * 3600:.0f} studies/h;"
        f" latency p50 {statistics.median(latencies):.2f} s, p95 {p95(latencies):.2f} s;"
        f" model time {inference:.2f} s of the wall ({inference / wall:.0%})"
    )
    print(f"    ratio end to end / pure batched: {e2e / pure:.3f} (target >= 0.9)")
    print(
        f"    1-min load average {load_before:.1f} before (a), {load_after:.1f} after (b) and (a) again"
        f" on {os.cpu_count()} CPUs (other processes on the machine skew both (a) and (b))"
    )
    print(
        f"(c) fairness: {args.small} {args.small_slices}-slice studies fired {args.gap:g} s apart,"
        f" alone and {args.lead:g} s after a {args.big_slices}-slice study:"
    )
    for label, values in (("alone", alone), ("behind the big study", behind)):
        print(
            f"    {label:<22} p50 {statistics.median(values):6.2f} s  p95 {p95(values):6.2f} s"
            f"  max {max(values):6.2f} s"
        )
    print(
        f"    big study: {big_latency:.2f} s, still running {big_after:.2f} s after the last small"
        " study was answered"
    )


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of `pid` in bytes (/proc/<pid>/status gives kB)."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def run_memory(args: argparse.Namespace) -> None:
    template = build_demo_study(min(args.instances, BRAIN_SLICES))
    with orthanc_in_tmp() as (orthanc, tmp, stack):
        warm_uid, warm = brain_study(template, WARM_UP_SLICES, "MEMWARM")
        store(orthanc.url, warm)
        study_uid, big = brain_study(template, args.instances, "MEM")
        t0 = time.perf_counter()
        store(orthanc.url, big)
        stored_s = time.perf_counter() - t0
        del big, warm
        server = stack.enter_context(facade(orthanc, tmp, args, analyze_timeout=args.timeout))
        pid = server.process.pid
        client = stack.enter_context(httpx.Client(base_url=server.base_url, timeout=args.timeout + 60))
        started = proc_status(pid)
        analyze(client, warm_uid)
        baseline = proc_status(pid)
        server.log.new_analyses()

        samples: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                try:
                    samples.append(proc_status(pid)["VmRSS"])
                except (OSError, KeyError):
                    return
                stop.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            seconds = analyze(client, study_uid)
        finally:
            stop.set()
            sampler.join(5)
        after = proc_status(pid)
        figures = server.log.new_analyses()

    mib = 2**20

    def vm(status: dict[str, int]) -> str:
        return f"VmRSS {status['VmRSS'] / mib:8.1f} MiB  VmHWM {status['VmHWM'] / mib:8.1f} MiB"

    peak = max(after["VmHWM"], max(samples, default=0))
    print(
        f"\nFacade memory, one {args.instances}-instance MR series (Colin27 slices cycled,"
        f" {template[0].Rows}x{template[0].Columns} uint16; stored in {stored_s:.1f} s)"
    )
    print(f"  after start-up:          {vm(started)}")
    print(f"  after {WARM_UP_SLICES}-slice warm-up:   {vm(baseline)}  (baseline; VmHWM cannot be reset)")
    print(
        f"  during the analysis:     max VmRSS {max(samples, default=0) / mib:8.1f} MiB"
        f" ({len(samples)} samples every 50 ms)"
    )
    print(f"  after the analysis:      {vm(after)}")
    print(
        f"  peak {peak / mib:.1f} MiB: {'under' if peak < GIB else 'OVER'} the 1 GiB target;"
        f" growth over baseline VmHWM {(after['VmHWM'] - baseline['VmHWM']) / mib:.1f} MiB"
    )
    line = f"  $analyze wall time {seconds:.1f} s ({seconds / args.instances:.3f} s/slice)"
    if figures:
        line += (
            f"; facade: analysis {figures[-1].seconds:.1f} s, inference {figures[-1].inference_seconds:.1f} s"
        )
    print(line)


def run_applicability(args: argparse.Namespace) -> None:
    if args.step:
        template = build_axial_study(list(range(0, 181, args.step)))
        what = f"every {args.step}. axial slice of Colin27"
    else:
        template = build_demo_study()
        what = "the demo study"
    study_uid, datasets = brain_study(template, len(template), "APPLICABILITY")
    with orthanc_in_tmp() as (orthanc, tmp, stack):
        store(orthanc.url, datasets)
        servers = {
            flag: stack.enter_context(
                facade(
                    orthanc,
                    tmp,
                    args,
                    name=f"facade-{flag}",
                    extra_env={"FACADE_ANALYZE_SLICE_APPLICABILITY": flag},
                )
            )
            for flag in ("true", "false")
        }
        clients = {
            flag: stack.enter_context(httpx.Client(base_url=server.base_url, timeout=600))
            for flag, server in servers.items()
        }
        conclusions = {}
        for flag, client in clients.items():  # warm-up, and what each one concludes
            report = client.post(f"/ImagingStudy/{study_uid}/$analyze").json()
            conclusions[flag] = report["conclusion"]
            servers[flag].log.new_analyses()
        wall: dict[str, list[float]] = {"true": [], "false": []}
        inside: dict[str, list[float]] = {"true": [], "false": []}
        offsets = {flag: server.log.path.stat().st_size for flag, server in servers.items()}
        for _ in range(args.rounds):
            for flag, client in clients.items():
                wall[flag].append(analyze(client, study_uid))
                inside[flag].extend(f.seconds for f in servers[flag].log.new_analyses())
        phases = {
            flag: _phase_medians(server.log.path.read_bytes()[offsets[flag] :].decode("utf-8", "replace"))
            for flag, server in servers.items()
        }
    print(f"\n$analyze of {what} ({len(datasets)} slices), {args.rounds} rounds, interleaved")
    header = ("POST median s", "min s", "max s", "server median s")
    print(f"{'applicability step':<20} {header[0]:>14} {header[1]:>7} {header[2]:>7} {header[3]:>16}")
    for flag in ("true", "false"):
        print(
            f"{'on' if flag == 'true' else 'off':<20} {statistics.median(wall[flag]):>14.3f} "
            f"{min(wall[flag]):>7.3f} {max(wall[flag]):>7.3f} {statistics.median(inside[flag]):>16.3f}"
        )
    print("phases inside Analyzer.analyze (medians, s): on / off")
    for name in phases["true"]:
        print(f"  {name:<10} {phases['true'][name]:>8.3f} / {phases['false'].get(name, 0.0):.3f}")
    for flag in ("true", "false"):
        print(f"conclusion ({'on' if flag == 'true' else 'off'}): {conclusions[flag]}")


def run_saliency(args: argparse.Namespace) -> None:
    template = build_demo_study()
    study_uid, datasets = brain_study(template, len(template), "SALIENCY")
    common = {"FACADE_ANALYZE_SLICE_APPLICABILITY": "false"}
    with orthanc_in_tmp() as (orthanc, tmp, stack):
        store(orthanc.url, datasets)
        servers = {
            flag: stack.enter_context(
                facade(
                    orthanc,
                    tmp,
                    args,
                    name=f"facade-saliency-{flag}",
                    extra_env={
                        **common,
                        "FACADE_ANALYZE_SALIENCY": flag,
                        "FACADE_ANALYZE_SALIENCY_PATCH": str(args.patch),
                        "FACADE_ANALYZE_SALIENCY_STRIDE": str(args.stride),
                    },
                )
            )
            for flag in ("true", "false")
        }
        clients = {
            flag: stack.enter_context(httpx.Client(base_url=server.base_url, timeout=600))
            for flag, server in servers.items()
        }
        media = {}
        for flag, client in clients.items():  # warm-up, and whether a map was made
            report = client.post(f"/ImagingStudy/{study_uid}/$analyze").json()
            media[flag] = len(report.get("media", []))
            servers[flag].log.new_analyses()
        wall: dict[str, list[float]] = {"true": [], "false": []}
        inside: dict[str, list[float]] = {"true": [], "false": []}
        offsets = {flag: server.log.path.stat().st_size for flag, server in servers.items()}
        for _ in range(args.rounds):
            for flag, client in clients.items():
                wall[flag].append(analyze(client, study_uid))
                inside[flag].extend(f.seconds for f in servers[flag].log.new_analyses())
        phases = {
            flag: _phase_medians(server.log.path.read_bytes()[offsets[flag] :].decode("utf-8", "replace"))
            for flag, server in servers.items()
        }
    on, off = statistics.median(wall["true"]), statistics.median(wall["false"])
    print(
        f"\n$analyze of the demo study ({len(datasets)} slices, applicability off), {args.rounds} rounds, "
        f"interleaved; saliency patch {args.patch}, stride {args.stride}"
    )
    header = ("POST median s", "min s", "max s", "server median s")
    print(f"{'saliency':<20} {header[0]:>14} {header[1]:>7} {header[2]:>7} {header[3]:>16}")
    for flag in ("true", "false"):
        print(
            f"{'on' if flag == 'true' else 'off':<20} {statistics.median(wall[flag]):>14.3f} "
            f"{min(wall[flag]):>7.3f} {max(wall[flag]):>7.3f} {statistics.median(inside[flag]):>16.3f}"
        )
    print(
        f"ratio on / off (POST medians): {on / off:.2f} "
        f"({'more' if on > 2 * off else 'not more'} than double)"
    )
    print("phases inside Analyzer.analyze (medians, s): on / off")
    for name in phases["true"]:
        print(f"  {name:<10} {phases['true'][name]:>8.3f} / {phases['false'].get(name, 0.0):.3f}")
    print(f"key-image media in the report: on {media['true']}, off {media['false']}")


#: The phase list at the end of the "Analyzed study" line: "(inference 1.23 s; select 0.010, ...)".
PHASES = re.compile(r"\(inference [\d.]+ s; (?P<phases>[^)]*)\)")


def _phase_medians(log_text: str) -> dict[str, float]:
    """Median seconds per phase over the "Analyzed study" lines of `log_text`."""
    values: dict[str, list[float]] = {}
    for match in PHASES.finditer(log_text):
        for item in match["phases"].split(", "):
            name, _, seconds = item.partition(" ")
            values.setdefault(name, []).append(float(seconds))
    return {name: statistics.median(items) for name, items in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmarks of $analyze (see the module docstring).")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    common.add_argument(
        "--providers", default=None, help="comma-separated ONNX Runtime providers, in order of preference"
    )
    parts = parser.add_subparsers(dest="part", required=True)
    ratio = parts.add_parser("ratio", parents=[common], help="end to end vs pure ONNX Runtime")
    ratio.add_argument("--slices", type=int, default=20)
    ratio.add_argument("--rounds", type=int, default=5)
    concurrency = parts.add_parser(
        "concurrency", parents=[common], help="batched throughput end to end vs pure, and fairness"
    )
    concurrency.add_argument("--studies", type=int, default=16, help="concurrent studies")
    concurrency.add_argument("--slices", type=int, default=20, help="slices per concurrent study")
    concurrency.add_argument("--workers", type=int, default=16, help="FACADE_ANALYZE_WORKERS")
    concurrency.add_argument("--max-batch", type=int, default=8, help="FACADE_INFERENCE_MAX_BATCH")
    concurrency.add_argument("--max-wait-ms", type=float, default=5.0, help="FACADE_INFERENCE_MAX_WAIT_MS")
    concurrency.add_argument("--pure-slices", type=int, default=96, help="slices of the pure measurement")
    concurrency.add_argument("--small", type=int, default=8, help="small studies per fairness set")
    concurrency.add_argument("--small-slices", type=int, default=2)
    concurrency.add_argument("--big-slices", type=int, default=200)
    concurrency.add_argument("--gap", type=float, default=0.5, help="seconds between small studies")
    concurrency.add_argument("--lead", type=float, default=2.0, help="seconds the big study goes first")
    memory = parts.add_parser("memory", parents=[common], help="peak RSS for one large series")
    memory.add_argument("--instances", type=int, default=500)
    memory.add_argument("--timeout", type=float, default=600, help="FACADE_ANALYZE_TIMEOUT, seconds")
    applicability = parts.add_parser("applicability", parents=[common], help="cost of the slice step")
    applicability.add_argument("--rounds", type=int, default=5)
    applicability.add_argument("--step", type=int, default=0, help="every k-th Colin27 slice (0: demo)")
    saliency = parts.add_parser("saliency", parents=[common], help="cost of the saliency map")
    saliency.add_argument("--rounds", type=int, default=3)
    saliency.add_argument("--patch", type=int, default=48, help="FACADE_ANALYZE_SALIENCY_PATCH")
    saliency.add_argument("--stride", type=int, default=24, help="FACADE_ANALYZE_SALIENCY_STRIDE")
    args = parser.parse_args()
    parts_by_name = {
        "ratio": run_ratio,
        "concurrency": run_concurrency,
        "memory": run_memory,
        "applicability": run_applicability,
        "saliency": run_saliency,
    }
    parts_by_name[args.part](args)


if __name__ == "__main__":
    main()
