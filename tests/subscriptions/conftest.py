"""Subscription test fixtures: a real HTTP receiver on a loopback port and a real Orthanc, for each
test module, a facade watching that Orthanc's change feed, and a throwaway PostgreSQL database."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from fhir_facade.embedded import EmbeddedOrthanc, free_port
from tests.conftest import LiveServer, serve
from tests.store.conftest import ADMIN_URL
from tests.subscriptions.receiver import Receiver


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    hook.start()
    yield hook
    hook.stop()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedOrthanc]:
    """A module's own Orthanc (StableAge 1 s, loopback without credentials), for the study topic's
    tests, which watch its change feed."""
    with EmbeddedOrthanc(
        tmp_path_factory.mktemp("orthanc-subscriptions"),
        http_port=free_port(),
        dicom_port=free_port(),
        stable_age=1,
        http_auth=False,
    ) as instance:
        yield instance


def watching_facade(pacs: EmbeddedOrthanc, receiver: Receiver, **overrides: Any) -> LiveServer:
    """A facade (not started) that watches `pacs`'s change feed and may deliver to `receiver`; no
    arrival Tasks unless `task_modalities` says so."""
    return serve(
        {
            "dicomweb_url": pacs.dicomweb_url,
            "orthanc_url": pacs.url,
            "watch_studies": True,
            "watch_poll_interval": 0.3,
            "task_modalities": [],
            "subscription_endpoints": [f"http://127.0.0.1:{receiver.port}/"],
            "subscription_poll_interval": 0.05,
            **overrides,
        }
    )


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database on the local server (127.0.0.1:5432, as the store tests
    use it; FACADE_TEST_POSTGRES_URL overrides), dropped afterwards."""
    name = f"facade_subs_{secrets.token_hex(6)}"
    with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{ADMIN_URL.rsplit('/', 1)[0]}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
