"""Store fixtures: every store test runs on a fresh SQLite file and on PostgreSQL.

PostgreSQL: one database `facade_test_<random>` per test session on 127.0.0.1:5432 (user
postgres, overridable with FACADE_TEST_POSTGRES_URL), emptied before each test and dropped at the
end. If the server cannot be reached the PostgreSQL variants fail (CI has it), they do not skip.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fhir.resources.R4B import get_fhir_model_class
from sqlalchemy import Engine, text

from fhir_facade.fhir.search import SearchRequest, parse_search
from fhir_facade.store import (
    ResourceStore,
    create_store_engine,
    search_param_defs,
    sortable_params,
    upgrade,
)
from tests.outbox_store import store_with_outbox

ADMIN_URL = os.environ.get("FACADE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
#: First instant the test clock hands out; each write is one second later than the previous.
EPOCH = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


class TickingClock:
    """A clock that advances one second per call, so write order = lastUpdated order."""

    def __init__(self) -> None:
        self.now = EPOCH

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    name = f"facade_test_{secrets.token_hex(6)}"
    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {ADMIN_URL} ({exc}); the store tests need it "
            "(set FACADE_TEST_POSTGRES_URL to a server where user may CREATE DATABASE)",
            pytrace=False,
        )
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            base = ADMIN_URL.rsplit("/", 1)[0]
            yield f"{base}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An empty database (no tables yet) of each kind."""
    if request.param == "sqlite":
        engine = create_store_engine(f"sqlite:///{tmp_path / 'store.db'}")
    else:
        engine = create_store_engine(request.getfixturevalue("postgres_database"))
        with engine.begin() as connection:
            connection.execute(text("DROP SCHEMA public CASCADE"))
            connection.execute(text("CREATE SCHEMA public"))
    yield engine
    engine.dispose()


@pytest.fixture
def clock() -> TickingClock:
    return TickingClock()


@pytest.fixture
def store(engine: Engine, clock: TickingClock) -> ResourceStore:
    upgrade(engine)
    return store_with_outbox(engine, clock)


def valid(resource: dict[str, Any]) -> dict[str, Any]:
    """Assert that `resource` is a valid R4 resource (fhir.resources.R4B) and return it."""
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    return resource


def search_request(resource_type: str, query: list[tuple[str, str]], *, strict: bool = True) -> SearchRequest:
    """Parse a query the way the HTTP layer does (strict: unknown parameters and `_sort` keys
    are errors), with the store's sortable keys."""
    return parse_search(
        resource_type,
        query,
        search_param_defs(resource_type),
        base_url="http://example.org/fhir",
        strict=strict,
        default_count=50,
        max_count=500,
        sortable=sortable_params(resource_type),
    )
