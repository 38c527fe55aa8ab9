"""Fixtures for replica tests: N real facade processes (`python -m fhir_facade serve`) on one fresh
PostgreSQL database (127.0.0.1:5432, see tests/store/conftest.py), each its own OS process so that
a test can SIGKILL or SIGSTOP it.

`fresh_postgres_url` gives each test its own database (dropped afterwards); `ReplicaSet` starts the
processes *together* (the schema upgrade races, as in a real roll-out), names them replica-0..N-1
(FACADE_REPLICA_ID, the holder name in the `lease` table) and keeps each one's log in a file that
a failing test prints. Short lease times come from the `env` the test passes
(FACADE_REPLICA_LEASE_SECONDS).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy import Engine, text

from fhir_facade.embedded import free_port
from fhir_facade.store import create_store_engine
from tests.facade_process import wait_for
from tests.store.conftest import ADMIN_URL

__all__ = ["Replica", "ReplicaSet", "lease_holder"]


@pytest.fixture
def fresh_postgres_url() -> Iterator[str]:
    """An empty PostgreSQL database of its own for one test."""
    with _database() as url:
        yield url


@pytest.fixture(scope="module")
def module_postgres_url() -> Iterator[str]:
    """An empty PostgreSQL database shared by the tests of one module (one replica set)."""
    with _database() as url:
        yield url


@contextmanager
def _database() -> Iterator[str]:
    name = f"facade_replicas_{secrets.token_hex(6)}"
    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {ADMIN_URL} ({exc})", pytrace=False)
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{ADMIN_URL.rsplit('/', 1)[0]}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def replica_engine(fresh_postgres_url: str) -> Iterator[Engine]:
    """An engine on the test's database, for looking at leases and counting rows."""
    engine = create_store_engine(fresh_postgres_url)
    yield engine
    engine.dispose()


class Replica:
    """One facade process."""

    def __init__(self, name: str, env: dict[str, str], port: int, log: Path) -> None:
        self.name, self.env, self.port, self.log = name, env, port, log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root}/fhir"

    def launch(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fhir_facade", "serve", "--port", str(self.port)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")
        try:
            return httpx.get(f"{self.base_url}/metadata", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def signal(self, number: int) -> None:
        assert self.process is not None
        self.process.send_signal(number)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.process is not None
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused process cannot stop
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


class ReplicaSet:
    """`count` replicas with one environment (each gets its port, name and log), started together."""

    def __init__(
        self, count: int, env: dict[str, str], logs: Path, *, public_port: int | None = None
    ) -> None:
        """`public_port`: every replica's FACADE_BASE_URL names this one port (as behind a load
        balancer: one public URL, one token audience); by default each names its own."""
        self.replicas: list[Replica] = []
        for n in range(count):
            port = free_port()
            base = f"http://127.0.0.1:{public_port or port}/fhir"
            replica_env = {
                **os.environ,
                "FACADE_BASE_URL": base,
                "FACADE_REPLICA_ID": f"replica-{n}",
                "FACADE_LOG_LEVEL": "INFO",
                **env,
            }
            self.replicas.append(Replica(f"replica-{n}", replica_env, port, logs / f"replica-{n}.log"))

    def __enter__(self) -> ReplicaSet:
        for replica in self.replicas:
            replica.launch()
        try:
            wait_for(lambda: all(r.ready() for r in self.replicas), timeout=120)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        for replica in self.replicas:
            replica.stop()

    def __getitem__(self, n: int) -> Replica:
        return self.replicas[n]

    def by_name(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.name == name)

    def logs(self) -> str:
        return "\n".join(f"--- {r.name} ---\n{r.tail()}" for r in self.replicas)


def lease_holder(engine: Engine, name_prefix: str) -> str | None:
    """The holder of the live lease whose name starts with `name_prefix`, if any."""
    with engine.connect() as connection:
        holder = connection.execute(
            text("SELECT holder FROM lease WHERE name LIKE :p AND expires_at > :now"),
            {"p": name_prefix + "%", "now": datetime.now(UTC)},
        ).scalar_one_or_none()
    return str(holder) if holder is not None else None
