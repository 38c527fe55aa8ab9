"""Conditional create and conditional update under concurrency, over real HTTP (FHIR R4
http.html#ccreate and http.html#cond-update: the criteria decide whether a resource is created,
so the server must create at most one however many identical requests arrive at once).

Fifty identical requests are fired at the same time (one connection each) at a real facade, at two
facade processes sharing the database, and as fifty transaction Bundles; afterwards exactly one
resource matches the criteria, every answer is 200 or 201, and every stored version has its
outbox row (an upstream is configured but nobody drains the outbox). The store's side of the
guard (fhir/conditional_guard.py) is tested directly too. Each test runs on a SQLite file and on
PostgreSQL (the `engine` fixture of tests/store/conftest.py).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text

from fhir_facade.embedded import EmbeddedOrthanc, free_port
from fhir_facade.fhir.conditional_guard import ConditionalGuard, ConditionChanged, guarded
from fhir_facade.fhir.errors import FhirError
from fhir_facade.resources.stored import StoredResourceProvider
from fhir_facade.store import ResourceStore
from tests.concurrent_requests import PARALLEL, all_at_once, assert_one_created
from tests.conftest import ok_json, serve
from tests.facade_process import FacadeProcess
from tests.store.conftest import search_request

FHIR_JSON = {"Content-Type": "application/fhir+json"}
#: A configured upstream turns the outbox on; no worker runs, so every row stays to be counted.
NO_UPSTREAM = "http://127.0.0.1:9/fhir"


def database_url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


@pytest.fixture
def facade_url(engine: Engine, orthanc: EmbeddedOrthanc) -> Iterator[str]:
    """One facade (in this process) on a fresh database of each kind, with the outbox on."""
    settings = {
        "database_url": database_url(engine),
        "dicomweb_url": orthanc.dicomweb_url,
        "fhir_upstream_url": NO_UPSTREAM,
        "sync_in_process": False,
    }
    with serve(settings) as server:
        yield server.base_url


@pytest.fixture
def two_processes(engine: Engine, orthanc: EmbeddedOrthanc) -> Iterator[list[str]]:
    """Two facade OS processes (replicas) on the same database."""
    processes = []
    try:
        for _ in range(2):
            port = free_port()
            env = {
                **os.environ,
                "FACADE_DATABASE_URL": database_url(engine),
                "FACADE_DICOMWEB_URL": orthanc.dicomweb_url,
                "FACADE_BASE_URL": f"http://127.0.0.1:{port}/fhir",
                "FACADE_FHIR_UPSTREAM_URL": NO_UPSTREAM,
                "FACADE_SYNC_IN_PROCESS": "false",
                "FACADE_ANALYZE_ENABLED": "false",
                "FACADE_WATCH_STUDIES": "false",
                "FACADE_LOG_LEVEL": "WARNING",
            }
            process = FacadeProcess(env, port)
            processes.append(process)
            process.start()
        yield [p.base_url for p in processes]
    finally:
        for process in processes:
            process.stop()


def marked(resource_type: str, system: str, value: str, n: int) -> dict[str, Any]:
    """A valid resource of the type carrying the identifier system|value (n tells requests apart)."""
    identifier = [{"system": system, "value": value}]
    note = f"request {n}"
    if resource_type == "Observation":
        return {
            "resourceType": "Observation",
            "status": "final",
            "identifier": identifier,
            "code": {"text": "race"},
            "valueString": note,
        }
    if resource_type == "ServiceRequest":
        return {
            "resourceType": "ServiceRequest",
            "status": "active",
            "intent": "order",
            "identifier": identifier,
            "subject": {"reference": "Patient/P-RACE"},
            "note": [{"text": note}],
        }
    if resource_type == "Patient":
        return {"resourceType": "Patient", "identifier": identifier, "name": [{"text": note}]}
    raise AssertionError(resource_type)


def assert_stored_once(
    engine: Engine, base_url: str, resource_type: str, criteria: str, resource_id: str, versions: int
) -> None:
    """One resource matches the criteria (searched over HTTP); the database holds one resource of
    the type with `versions` versions, and one outbox row per version."""
    with httpx.Client(base_url=base_url, timeout=30) as client:
        found = ok_json(client.get(f"/{resource_type}?{criteria}"))
    assert found["total"] == 1 and found["entry"][0]["resource"]["id"] == resource_id
    with engine.connect() as connection:

        def count(table: str) -> int:
            return int(
                connection.execute(
                    text(f"SELECT count(*) FROM {table} WHERE resource_type = :type"), {"type": resource_type}
                ).scalar_one()
            )

        assert count("resource_current") == 1
        assert count("resource_version") == versions
        assert count("outbox") == versions


@pytest.mark.parametrize("resource_type", ["Observation", "ServiceRequest", "Patient"])
async def test_parallel_conditional_creates_store_one(
    engine: Engine, facade_url: str, resource_type: str
) -> None:
    system, value = "urn:test:race", secrets.token_hex(4)
    criteria = f"identifier={system}|{value}"

    async def send(client: httpx.AsyncClient, n: int) -> httpx.Response:
        return await client.post(
            f"/{resource_type}",
            json=marked(resource_type, system, value, n),
            headers={**FHIR_JSON, "If-None-Exist": criteria},
        )

    resource_id = assert_one_created(await all_at_once([facade_url], send))
    assert_stored_once(engine, facade_url, resource_type, criteria, resource_id, versions=1)


async def test_parallel_conditional_updates_create_one_and_update_it(engine: Engine, facade_url: str) -> None:
    """The first to get through creates; every other one updates that resource (one version each)."""
    system, value = "urn:test:race", secrets.token_hex(4)
    criteria = f"identifier={system}|{value}"

    async def send(client: httpx.AsyncClient, n: int) -> httpx.Response:
        return await client.put(
            f"/Observation?{criteria}", json=marked("Observation", system, value, n), headers=FHIR_JSON
        )

    resource_id = assert_one_created(await all_at_once([facade_url], send))
    assert_stored_once(engine, facade_url, "Observation", criteria, resource_id, versions=PARALLEL)


async def test_parallel_transaction_bundles_with_conditional_create_store_one(
    engine: Engine, facade_url: str
) -> None:
    system, value = "urn:test:race", secrets.token_hex(4)
    criteria = f"identifier={system}|{value}"

    async def send(client: httpx.AsyncClient, n: int) -> httpx.Response:
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "fullUrl": f"urn:uuid:{secrets.token_hex(16)}",
                    "resource": marked("Observation", system, value, n),
                    "request": {"method": "POST", "url": "Observation", "ifNoneExist": criteria},
                }
            ],
        }
        return await client.post("", json=bundle, headers=FHIR_JSON)

    responses = await all_at_once([facade_url], send)
    failures = [(r.status_code, r.text[:300]) for r in responses if r.status_code != 200]
    assert not failures, failures[:3]
    entries = [r.json()["entry"][0] for r in responses]
    statuses = [e["response"]["status"] for e in entries]
    assert statuses.count("201 Created") == 1 and statuses.count("200 OK") == PARALLEL - 1, statuses
    ids = {e["resource"]["id"] for e in entries}
    assert len(ids) == 1, ids
    assert_stored_once(engine, facade_url, "Observation", criteria, ids.pop(), versions=1)


async def test_two_facade_processes_store_one(engine: Engine, two_processes: list[str]) -> None:
    """Replicas on one database: the requests are split between two facade processes, so only a
    lock the database holds can keep them apart."""
    system, value = "urn:test:race", secrets.token_hex(4)
    criteria = f"identifier={system}|{value}"

    async def create(client: httpx.AsyncClient, n: int) -> httpx.Response:
        body = marked("Observation", system, value, n)
        return await client.post("/Observation", json=body, headers={**FHIR_JSON, "If-None-Exist": criteria})

    async def update(client: httpx.AsyncClient, n: int) -> httpx.Response:
        body = marked("Observation", system, value, n)
        return await client.put(f"/Observation?{criteria}", json=body, headers=FHIR_JSON)

    resource_id = assert_one_created(await all_at_once(two_processes, create))
    assert_stored_once(engine, two_processes[0], "Observation", criteria, resource_id, versions=1)

    updated = await all_at_once(two_processes, update)
    failures = [(r.status_code, r.text[:300]) for r in updated if r.status_code != 200]
    assert not failures, failures[:3]
    assert {r.json()["id"] for r in updated} == {resource_id}
    assert_stored_once(engine, two_processes[1], "Observation", criteria, resource_id, versions=1 + PARALLEL)


def count_rows(engine: Engine, table: str, resource_type: str) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                text(f"SELECT count(*) FROM {table} WHERE resource_type = :type"), {"type": resource_type}
            ).scalar_one()
        )


def test_a_guarded_write_whose_matches_changed_writes_nothing(engine: Engine, store: ResourceStore) -> None:
    """The store re-runs the recorded search under the lock: a match created since (here by an
    unconditional create) makes the conditional create fail with 409 before it writes a row."""
    system, value = "urn:test:guard", secrets.token_hex(4)
    request = search_request("Observation", [("identifier", f"{system}|{value}")])
    guard = ConditionalGuard("Observation", f"identifier={system}|{value}")
    matches, total = store.search(request)
    guard.record(request, [m["id"] for m in matches], total)
    store.create(marked("Observation", system, value, 0))

    with pytest.raises(ConditionChanged) as raised:
        store.create(marked("Observation", system, value, 1), guard=guard)
    assert raised.value.status == 409 and raised.value.issues[0].code == "conflict"
    for table in ("resource_current", "resource_version", "outbox"):
        assert count_rows(engine, table, "Observation") == 1, table


def test_a_guarded_write_without_its_search_is_refused(store: ResourceStore) -> None:
    with pytest.raises(RuntimeError, match="without its recorded search"):
        store.create(
            marked("Observation", "urn:test:guard", "x", 0), guard=ConditionalGuard("Observation", "x")
        )


async def test_guarded_gives_up_with_409_when_the_matches_keep_changing(
    engine: Engine, store: ResourceStore
) -> None:
    """Between each attempt's search and its write another writer adds a match, so every attempt
    fails its check; after the last one the client gets 409 conflict and nothing of it is stored."""
    provider = StoredResourceProvider("Observation", store)
    system, value = "urn:test:guard", secrets.token_hex(4)
    params = [("identifier", f"{system}|{value}")]

    async def attempt(guard: ConditionalGuard) -> dict[str, Any]:
        with guard.searching():
            await provider.search(search_request("Observation", params))
        store.create(marked("Observation", system, value, -1))  # the competitor, unconditional
        with guard.writing():
            return await provider.create(marked("Observation", system, value, 0))

    with pytest.raises(FhirError) as raised:
        await guarded("Observation", params, attempt)
    assert raised.value.status == 409 and raised.value.issues[0].code == "conflict"
    assert not isinstance(raised.value, ConditionChanged)
    competitors = 5  # one per attempt (conditional_guard._ATTEMPTS)
    assert count_rows(engine, "resource_current", "Observation") == competitors
