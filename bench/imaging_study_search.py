"""Benchmark: ImagingStudy search pages through the facade vs the minimal direct QIDO-RS requests
that give the same answer (one study query + one series query for the page), on one Orthanc, in
one run, interleaved. Prints median latencies, their ratio, and QIDO requests per facade page.

    .venv/bin/python bench/imaging_study_search.py [--studies 120] [--rounds 40]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import facade_process
from fhir_facade.embedded import EmbeddedOrthanc, free_port
from fhir_facade.resources.imaging_study import SERIES_FIELDS, STUDY_FIELDS
from tests.dicom_factory import SeriesSpec, StudySpec, build_study, upload


def load_studies(orthanc_url: str, count: int) -> None:
    with httpx.Client(timeout=60) as client:
        for n in range(count):
            spec = StudySpec(
                patient_id=f"BENCH-{n % 40:03d}",
                patient_name=f"Bench^Patient{n % 40}",
                study_uid=f"1.2.826.0.1.3680043.8.498.99.{n + 1}",
                accession=f"B{n:05d}",
                study_date=f"2024{1 + n % 12:02d}{1 + n % 28:02d}",
                study_time="101500",
                timezone_offset="+0100",
                description="BENCH MR BRAIN",
                series=[
                    SeriesSpec("MR", "T1", 1, body_part="BRAIN", n_instances=2),
                    SeriesSpec("MR", "T2", 2, body_part="BRAIN", n_instances=2),
                    SeriesSpec("MR", "FLAIR", 3, body_part="BRAIN", n_instances=1),
                ],
            )
            upload(client, orthanc_url, build_study(spec))


def qido_requests(metrics_url: str) -> float:
    """PACS requests so far: QIDO-RS plus Orthanc REST (the count query)."""
    wanted = {"fhir_facade_qido_requests", "fhir_facade_orthanc_requests"}
    families = text_string_to_metric_families(httpx.get(metrics_url).text)
    return sum(sample.value for family in families if family.name in wanted for sample in family.samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--studies", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory() as tmp,
        EmbeddedOrthanc(Path(tmp), http_port=free_port(), dicom_port=free_port(), http_auth=False) as orthanc,
    ):
        load_studies(orthanc.url, args.studies)
        env = {
            "FACADE_DICOMWEB_URL": orthanc.dicomweb_url,
            "FACADE_ORTHANC_URL": orthanc.url,
            "FACADE_DATA_DIR": f"{tmp}/facade",
        }
        with facade_process(env) as facade:
            fhir = httpx.Client(base_url=facade.base_url, timeout=30)
            qido = httpx.Client(
                base_url=orthanc.dicomweb_url,
                timeout=30,
                headers={"Accept": "application/dicom+json"},
            )
            metrics = facade.base_url.removesuffix("/fhir") + "/metrics"
            print(f"{args.studies} studies x 3 series in Orthanc; {args.rounds} rounds per figure")
            print(
                f"{'page':>5} {'facade ms':>10} {'direct ms':>10} {'ratio':>6} {'PACS req/page':>14}"
                f" {'_total=none ms':>15} {'ratio':>6} {'PACS req/page':>14}"
            )
            for size in (10, 50):
                facade_ms, direct_ms, no_total_ms = [], [], []
                before = qido_requests(metrics)
                for _ in range(args.rounds):
                    t0 = time.perf_counter()
                    bundle = fhir.get("/ImagingStudy", params={"_count": size}).json()
                    facade_ms.append((time.perf_counter() - t0) * 1000)
                    assert len(bundle["entry"]) == size

                    t0 = time.perf_counter()
                    studies = qido.get(
                        "/studies",
                        params=[("limit", size)] + [("includefield", f) for f in STUDY_FIELDS],
                    ).json()
                    uids = ",".join(s["0020000D"]["Value"][0] for s in studies)
                    qido.get(
                        "/series",
                        params=[("StudyInstanceUID", uids)] + [("includefield", f) for f in SERIES_FIELDS],
                    ).json()
                    direct_ms.append((time.perf_counter() - t0) * 1000)
                per_page = (qido_requests(metrics) - before) / args.rounds
                before = qido_requests(metrics)
                for _ in range(args.rounds):
                    t0 = time.perf_counter()
                    fhir.get("/ImagingStudy", params={"_count": size, "_total": "none"}).json()
                    no_total_ms.append((time.perf_counter() - t0) * 1000)
                per_page_no_total = (qido_requests(metrics) - before) / args.rounds
                f, d = statistics.median(facade_ms), statistics.median(direct_ms)
                n = statistics.median(no_total_ms)
                print(
                    f"{size:>5} {f:>10.1f} {d:>10.1f} {f / d:>6.2f} {per_page:>14.1f}"
                    f" {n:>15.1f} {n / d:>6.2f} {per_page_no_total:>14.1f}"
                )


if __name__ == "__main__":
    main()
