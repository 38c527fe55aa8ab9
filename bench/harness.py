"""Plumbing the benchmarks share: waiting for a server, throwaway PostgreSQL databases."""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg

__all__ = ["pg_database", "wait_ready"]


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
