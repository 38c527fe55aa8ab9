"""ImagingStudy/$import of a 1,000-instance zip against posting the same files straight to Orthanc.

In one run: 1,000 CT instances of 512 x 512 x 16 bits (~0.5 GB) are written to a temporary folder
and zipped (deflate); then
- baseline: every file is posted to a fresh Orthanc's REST API (`POST /instances`), by as many
  concurrent connections as the facade uses (`--connections`, default the facade's 4), and
  sequentially (one connection, what a script or `curl` loop does);
- import: the zip is posted to `ImagingStudy/$import` of a facade process (its own process, so its
  peak RSS is its own: VmHWM of /proc/<pid>/status) in front of another fresh Orthanc.
Throughput is instances per second, from the first byte sent to the last answer; the import's time
includes the upload, validation (pydicom on every instance, dciodvfy on the first of the series),
and storing. Target (issue 16): RSS < 1 GiB, import >= 0.8 x baseline. Everything is deleted at the end.

Each phase also reports the CPU seconds of each process (Orthanc, the facade, this client) from
/proc/<pid>/stat: on a machine of 2 cores the three compete, and the sum says whether a phase was
bound by CPU or by waiting. `--rounds N` runs the three ways N times in turn, each against fresh
servers, and reports the median ratios (on a shared machine one run varies by tens of percent).

    .venv/bin/python -m bench.import_zip [--instances 1000] [--connections 4] [--rounds 3]
        [--compression deflate|stored]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from bench.harness import facade_process
from fhir_facade.embedded import EmbeddedOrthanc, free_port


def _instance(study: str, series: str, frame: str, number: int, pixels: bytes) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = (
        "BENCH-1",
        "Bench^Import",
        "19700101",
        "O",
    )
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20261205", "120000", "BENCH", "1"
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [0, 0, float(number)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 1
    ds.PositionReferenceIndicator = ""
    ds.KVP, ds.AcquisitionNumber = 120, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = pixels
    return ds


def make_files(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(16)
    base = (np.add.outer(np.arange(512), np.arange(512)) * 3).astype(np.uint16)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for number in range(1, count + 1):
        pixels = (base + rng.integers(0, 64, (512, 512), dtype=np.uint16)) & 0x0FFF
        path = folder / f"IM{number:05d}.dcm"
        _instance(study, series, frame, number, pixels.tobytes()).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid`, all its threads and its waited-for children
    (dciodvfy), from /proc/<pid>/stat (proc(5): fields 14-17, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / _TICK


class CpuMeter:
    """CPU seconds each named process spent between `start()` and `stop()`, to say which process
    the wall time went to (on 2 cores Orthanc, the facade and the posting client compete)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.used: dict[str, float] = {}
        self.wall = 0.0

    def __enter__(self) -> CpuMeter:
        self._start = {name: _cpu_seconds(pid) for name, pid in self.pids.items()}
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *_: object) -> None:
        self.wall = time.perf_counter() - self._t0
        self.used = {name: _cpu_seconds(pid) - self._start[name] for name, pid in self.pids.items()}

    def line(self) -> str:
        parts = [f"{name} {used:5.1f} s ({used / self.wall:4.0%})" for name, used in self.used.items()]
        total = sum(self.used.values())
        return f"CPU: {', '.join(parts)}; together {total:.1f} s = {total / self.wall:.2f} cores"


def post_all(url: str, paths: list[Path], connections: int) -> float:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    with httpx.Client(base_url=url, timeout=120, limits=limits) as client:

        def post(path: Path) -> None:
            answer = client.post(
                "/instances", content=path.read_bytes(), headers={"Content-Type": "application/dicom"}
            )
            answer.raise_for_status()

        start = time.perf_counter()
        with ThreadPoolExecutor(connections) as pool:
            list(pool.map(post, paths))
        return time.perf_counter() - start


def _orthanc(root: Path, name: str) -> EmbeddedOrthanc:
    return EmbeddedOrthanc(root / name, http_port=free_port(), dicom_port=free_port(), http_auth=False)


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass(frozen=True)
class Phase:
    seconds: float
    cpu: str


@dataclass(frozen=True)
class Round:
    sequential: Phase
    direct: Phase
    imported: Phase
    upload_sent: float
    counts: dict[str, int]
    stored: int
    start_rss: int
    peak_rss: int

    @property
    def ratio_direct(self) -> float:
        return self.direct.seconds / self.imported.seconds

    @property
    def ratio_sequential(self) -> float:
        return self.sequential.seconds / self.imported.seconds


def _direct(root: Path, name: str, paths: list[Path], connections: int) -> Phase:
    with _orthanc(root, name) as pacs:
        assert pacs.pid is not None
        with CpuMeter({"orthanc": pacs.pid, "client": os.getpid()}) as meter:
            seconds = post_all(pacs.url, paths, connections)
    shutil.rmtree(root / name, ignore_errors=True)
    return Phase(seconds, meter.line())


def _round(root: Path, paths: list[Path], archive: Path, connections: int) -> Round:
    """Each way once, each against a fresh Orthanc (and a fresh facade with an empty ledger)."""
    root.mkdir()
    sequential = _direct(root, "orthanc-seq", paths, 1)
    direct = _direct(root, "orthanc-direct", paths, connections)
    with _orthanc(root, "orthanc-import") as pacs:
        env = {
            "FACADE_DICOMWEB_URL": pacs.dicomweb_url,
            "FACADE_ORTHANC_URL": pacs.url,
            "FACADE_DATABASE_URL": f"sqlite:///{root}/store.sqlite3",
            "FACADE_IMPORT_STORE_CONCURRENCY": str(connections),
            "FACADE_AUTH": "none",
        }
        with facade_process(env, log_path=root / "facade.log") as facade:
            start_rss = _peak_rss(facade.process.pid)
            uploaded: list[float] = []

            def chunks() -> Iterator[bytes]:
                with archive.open("rb") as source:
                    while chunk := source.read(1 << 20):
                        yield chunk
                uploaded.append(time.perf_counter())  # the facade has read all but a socket buffer

            assert pacs.pid is not None
            meter = CpuMeter({"orthanc": pacs.pid, "facade": facade.process.pid, "client": os.getpid()})
            start = time.perf_counter()
            with meter, httpx.Client(timeout=1800) as client:
                answer = client.post(
                    f"{facade.base_url}/ImagingStudy/$import",
                    content=chunks(),
                    headers={"Content-Type": "application/zip"},
                )
            imported = time.perf_counter() - start
            answer.raise_for_status()
            counts = {p["name"]: p["valueInteger"] for p in answer.json()["parameter"][0]["part"]}
            peak_rss = _peak_rss(facade.process.pid)
        stored = len(httpx.get(f"{pacs.url}/instances", timeout=60).json())
    shutil.rmtree(root, ignore_errors=True)
    imported_phase = Phase(imported, meter.line())
    return Round(sequential, direct, imported_phase, uploaded[0] - start, counts, stored, start_rss, peak_rss)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument(
        "--rounds", type=int, default=1, help="each way this often, in turn; the median ratios count"
    )
    parser.add_argument(
        "--compression", choices=("deflate", "stored"), default="deflate", help="how the zip holds its files"
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-import-"))
    try:
        files = root / "files"
        files.mkdir()
        t0 = time.perf_counter()
        paths = make_files(files, args.instances)
        archive = root / "study.zip"
        method = zipfile.ZIP_DEFLATED if args.compression == "deflate" else zipfile.ZIP_STORED
        with zipfile.ZipFile(archive, "w", method, compresslevel=1) as out:
            for path in paths:
                out.write(path, f"PATIENT/STUDY/SERIES/{path.name}")
        size = sum(p.stat().st_size for p in paths)
        print(
            f"{len(paths)} instances, {size / 2**20:.0f} MiB; "
            f"zip ({args.compression}) {archive.stat().st_size / 2**20:.0f} MiB "
            f"(made in {time.perf_counter() - t0:.0f} s)"
        )
        rounds = [_round(root / f"round-{r}", paths, archive, args.connections) for r in range(args.rounds)]
        n = len(paths)
        for number, row in enumerate(rounds, 1):
            print(f"round {number}:")
            print(
                f"  direct to Orthanc, 1 connection:  {row.sequential.seconds:6.1f} s  "
                f"{n / row.sequential.seconds:6.1f} instances/s; {row.sequential.cpu}"
            )
            print(
                f"  direct to Orthanc, {args.connections} connections: {row.direct.seconds:6.1f} s  "
                f"{n / row.direct.seconds:6.1f} instances/s; {row.direct.cpu}"
            )
            print(
                f"  facade $import (zip):            {row.imported.seconds:6.1f} s  "
                f"{n / row.imported.seconds:6.1f} instances/s; {row.imported.cpu}"
            )
            print(
                f"    upload sent after {row.upload_sent:.1f} s; {row.counts}; "
                f"stored in the import's Orthanc: {row.stored}; facade peak RSS "
                f"{row.peak_rss / 2**20:.0f} MiB (at start {row.start_rss / 2**20:.0f} MiB)"
            )
            print(
                f"  ratio import / direct ({args.connections} connections): {row.ratio_direct:.2f}; "
                f"import / direct (1 connection): {row.ratio_sequential:.2f}"
            )
        peak = max(row.peak_rss for row in rounds)
        print(
            f"median of {len(rounds)} round(s): import / direct ({args.connections} connections) "
            f"{statistics.median(r.ratio_direct for r in rounds):.2f}, import / direct (1 connection) "
            f"{statistics.median(r.ratio_sequential for r in rounds):.2f} (target >= 0.8); "
            f"facade peak RSS {peak / 2**20:.0f} MiB (target < 1024 MiB)"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
