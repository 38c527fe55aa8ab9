"""Plumbing the benchmarks share: a facade process, waiting for a server, throwaway PostgreSQL
databases."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg

from fhir_facade.embedded import free_port, stop_process

__all__ = ["FacadeProcess", "facade_process", "pg_database", "wait_ready"]

#: What every benchmarked facade runs with unless the bench says otherwise: no change feed, no models.
_BENCH_DEFAULTS = {
    "FACADE_WATCH_STUDIES": "false",
    "FACADE_ANALYZE_ENABLED": "false",
    "FACADE_LOG_LEVEL": "WARNING",
}


@dataclass(frozen=True)
class FacadeProcess:
    process: subprocess.Popen[bytes]
    base_url: str


@contextmanager
def facade_process(
    env: Mapping[str, str],
    *,
    port: int | None = None,
    log_path: Path | None = None,
    timeout: float = 60,
) -> Iterator[FacadeProcess]:
    """`fhir-facade serve` as its own process on `port` (default: a free one), configured by the bench
    defaults and `env` only (FACADE_* variables of the caller's environment are not inherited, so a
    figure never depends on the shell it was run from); stopped afterwards. Output goes to `log_path`
    when given."""
    port = port or free_port()
    full = {name: value for name, value in os.environ.items() if not name.startswith("FACADE_")}
    full |= {**_BENCH_DEFAULTS, "FACADE_BASE_URL": f"http://127.0.0.1:{port}/fhir", **env}
    command = [sys.executable, "-m", "fhir_facade", "serve", "--port", str(port)]
    if log_path is not None:
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(command, env=full, stdout=log_file, stderr=subprocess.STDOUT)
    else:
        process = subprocess.Popen(command, env=full)
    try:
        wait_ready(f"http://127.0.0.1:{port}/fhir/metadata", process, log_path=log_path, timeout=timeout)
        yield FacadeProcess(process, f"http://127.0.0.1:{port}/fhir")
    finally:
        stop_process(process)


def wait_ready(
    url: str,
    process: subprocess.Popen[bytes] | None = None,
    *,
    log_path: Path | None = None,
    timeout: float = 60,
) -> None:
    """Until `url` answers 200; fails early (with the log's tail) if `process` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:] if log_path else ""
            raise RuntimeError(f"server exited with {process.returncode}:\n{tail}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


@contextmanager
def pg_database(server_url: str) -> Iterator[str]:
    """A fresh database `facade_bench_<random>` on the server, dropped afterwards."""
    name = f"facade_bench_{secrets.token_hex(4)}"
    with psycopg.connect(f"{server_url}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{server_url}/{name}"
    finally:
        with psycopg.connect(f"{server_url}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
