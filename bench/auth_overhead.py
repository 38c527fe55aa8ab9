"""Benchmark: what SMART security adds to an ImagingStudy search.

Two facades on one Orthanc, in one run, requests interleaved: FACADE_AUTH=none and FACADE_AUTH=smart
(bearer JWT verified against a JWKS, scopes checked, patient confinement, an AuditEvent recorded per
request). Figures: median latency of a 20-study page, unconfined (`system/ImagingStudy.rs`) and
confined to one patient (`patient/ImagingStudy.rs`, compared with the same search given
`patient=` explicitly without auth, so both ask the PACS the same question).

    .venv/bin/python bench/auth_overhead.py [--studies 120] [--rounds 60]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import facade_process
from bench.imaging_study_search import load_studies
from fhir_facade.embedded import EmbeddedOrthanc, free_port
from tests.auth.issuer import TestIssuer


def timed(call: Callable[[], httpx.Response]) -> float:
    t0 = time.perf_counter()
    response = call()
    elapsed = (time.perf_counter() - t0) * 1000
    assert response.status_code == 200, response.text
    assert response.json().get("entry"), "an empty page measures nothing"
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--studies", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory() as tmp,
        EmbeddedOrthanc(
            Path(tmp) / "orthanc", http_port=free_port(), dicom_port=free_port(), http_auth=False
        ) as orthanc,
    ):
        load_studies(orthanc.url, args.studies)
        open_port, secured_port = free_port(), free_port()
        issuer = TestIssuer(audience=f"http://127.0.0.1:{secured_port}/fhir")
        common = {"FACADE_DICOMWEB_URL": orthanc.dicomweb_url, "FACADE_ORTHANC_URL": orthanc.url}
        smart = {
            "FACADE_AUTH": "smart",
            "FACADE_AUTH_ISSUER": issuer.issuer,
            "FACADE_AUTH_JWKS_URL": issuer.jwks.url,
        }
        with (
            closing(issuer),
            facade_process({**common, "FACADE_DATA_DIR": f"{tmp}/open"}, port=open_port) as open_facade,
            facade_process(
                {**common, **smart, "FACADE_DATA_DIR": f"{tmp}/secured"}, port=secured_port
            ) as secure,
            httpx.Client(base_url=open_facade.base_url, timeout=30) as open_fhir,
            httpx.Client(base_url=secure.base_url, timeout=30) as secured,
        ):
            system = issuer.headers("system/ImagingStudy.rs")
            confined = issuer.headers("launch/patient patient/ImagingStudy.rs", patient="BENCH-001")
            page = {"_count": 20}
            cases: dict[str, Callable[[], httpx.Response]] = {
                "open": lambda: open_fhir.get("/ImagingStudy", params=page),
                "smart system/": lambda: secured.get("/ImagingStudy", params=page, headers=system),
                "open patient=": lambda: open_fhir.get(
                    "/ImagingStudy", params={**page, "patient": "BENCH-001"}
                ),
                "smart patient/": lambda: secured.get("/ImagingStudy", params=page, headers=confined),
            }
            for call in cases.values():  # warm-up: pools, JWKS fetch, first queries
                for _ in range(5):
                    timed(call)
            samples: dict[str, list[float]] = {name: [] for name in cases}
            for _ in range(args.rounds):
                for name, call in cases.items():
                    samples[name].append(timed(call))
            medians = {name: statistics.median(values) for name, values in samples.items()}
            print(f"{args.studies} studies in Orthanc; {args.rounds} interleaved rounds; 20-study pages")
            print(f"{'case':<16} {'median ms':>10} {'p90 ms':>8}")
            for name, values in samples.items():
                p90 = statistics.quantiles(values, n=10)[-1]
                print(f"{name:<16} {medians[name]:>10.2f} {p90:>8.2f}")
            unconfined = medians["smart system/"] / medians["open"]
            confined_ratio = medians["smart patient/"] / medians["open patient="]
            print(f"auth overhead, unconfined search: {unconfined:.3f} (target <= 1.10)")
            print(f"auth overhead, patient-confined search: {confined_ratio:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
