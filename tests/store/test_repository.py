"""The FHIR interactions of `ResourceStore` (R4 http.html) on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import Engine

from fhir_facade.fhir.errors import FhirError
from fhir_facade.store import MIGRATIONS, ResourceStore, upgrade
from fhir_facade.store.migrations import current_version
from tests.store.conftest import valid


def task(status: str = "requested", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Task", "status": status, "intent": "order", **extra}


def test_create_assigns_id_version_and_last_updated(store: ResourceStore) -> None:
    created = valid(store.create({**task(), "id": "ignored", "meta": {"tag": [{"code": "t"}]}}))
    assert created["id"] != "ignored" and len(created["id"]) == 32
    assert created["meta"]["versionId"] == "1"
    assert created["meta"]["tag"] == [{"code": "t"}]
    last_updated = datetime.fromisoformat(created["meta"]["lastUpdated"])
    assert last_updated.utcoffset() is not None
    assert store.read("Task", created["id"]) == created


def test_read_unknown_is_404(store: ResourceStore) -> None:
    with pytest.raises(FhirError) as info:
        store.read("Task", "nope")
    assert info.value.status == 404
    assert info.value.issues[0].code == "not-found"


def test_update_bumps_version_and_vread_returns_each(store: ResourceStore) -> None:
    created = store.create(task())
    result = store.update({**created, "status": "in-progress"})
    assert not result.created
    assert valid(result.resource)["meta"]["versionId"] == "2"
    assert result.resource["meta"]["lastUpdated"] > created["meta"]["lastUpdated"]
    assert store.read("Task", created["id"])["status"] == "in-progress"
    assert store.vread("Task", created["id"], "1") == created
    assert store.vread("Task", created["id"], "2") == result.resource
    for missing in ("3", "x"):
        with pytest.raises(FhirError) as info:
            store.vread("Task", created["id"], missing)
        assert (info.value.status, info.value.issues[0].code) == (404, "not-found")


def test_update_as_create_uses_the_client_id(store: ResourceStore) -> None:
    result = store.update(task(id="client-chosen.1"))
    assert result.created
    assert valid(result.resource)["meta"]["versionId"] == "1"
    assert store.read("Task", "client-chosen.1")["id"] == "client-chosen.1"


def test_update_without_valid_id_is_400(store: ResourceStore) -> None:
    with pytest.raises(FhirError) as info:
        store.update(task(id="bad id!"))
    assert (info.value.status, info.value.issues[0].code) == (400, "invalid")
    assert info.value.issues[0].expression == ("Task.id",)


def test_if_match_current_version_succeeds(store: ResourceStore) -> None:
    created = store.create(task())
    result = store.update({**created, "status": "accepted"}, if_match='W/"1"')
    assert result.resource["meta"]["versionId"] == "2"


@pytest.mark.parametrize("etag", ['W/"1"', '"1"', 'W/"7"'])
def test_if_match_stale_version_is_412(store: ResourceStore, etag: str) -> None:
    created = store.create(task())
    store.update({**created, "status": "accepted"})
    with pytest.raises(FhirError) as info:
        store.update({**created, "status": "rejected"}, if_match=etag)
    assert (info.value.status, info.value.issues[0].code) == (412, "conflict")
    assert store.read("Task", created["id"])["status"] == "accepted"


def test_if_match_on_unknown_resource_is_412(store: ResourceStore) -> None:
    with pytest.raises(FhirError) as info:
        store.update(task(id="absent"), if_match='W/"1"')
    assert (info.value.status, info.value.issues[0].code) == (412, "conflict")


def test_malformed_if_match_is_400(store: ResourceStore) -> None:
    created = store.create(task())
    with pytest.raises(FhirError) as info:
        store.update(created, if_match="W/abc")
    assert (info.value.status, info.value.issues[0].code) == (400, "invalid")
    assert info.value.issues[0].expression == ("If-Match",)


def test_delete_then_read_is_410_and_delete_is_idempotent(store: ResourceStore) -> None:
    created = store.create(task())
    store.delete("Task", created["id"])
    with pytest.raises(FhirError) as info:
        store.read("Task", created["id"])
    assert (info.value.status, info.value.issues[0].code) == (410, "deleted")
    store.delete("Task", created["id"])  # already deleted: no new version
    store.delete("Task", "never-existed")  # nothing to delete: still fine
    _, total = store.history("Task", created["id"])
    assert total == 2
    with pytest.raises(FhirError) as info:
        store.vread("Task", created["id"], "2")
    assert info.value.status == 410
    assert store.vread("Task", created["id"], "1") == created


def test_update_after_delete_resurrects_with_next_version(store: ResourceStore) -> None:
    created = store.create(task())
    store.delete("Task", created["id"])
    result = store.update({**created, "status": "cancelled"})
    assert not result.created
    assert valid(result.resource)["meta"]["versionId"] == "3"
    assert store.read("Task", created["id"])["status"] == "cancelled"


def test_history_newest_first_with_deletion_stub(store: ResourceStore) -> None:
    created = store.create(task())
    store.update({**created, "status": "accepted"})
    store.delete("Task", created["id"])
    entries, total = store.history("Task", created["id"])
    assert total == 3
    assert [e["meta"]["versionId"] for e in entries] == ["3", "2", "1"]
    assert entries[0]["_deleted"] is True and "status" not in entries[0]
    assert [e.get("status") for e in entries[1:]] == ["accepted", "requested"]
    for entry in entries[1:]:
        valid(entry)
    page, total = store.history("Task", created["id"], count=1, offset=1)
    assert total == 3 and [e["meta"]["versionId"] for e in page] == ["2"]
    with pytest.raises(FhirError) as info:
        store.history("Task", "unknown")
    assert info.value.status == 404


def test_type_history_spans_resources_newest_first(store: ResourceStore) -> None:
    first = store.create(task())
    second = store.create(task())
    store.update({**first, "status": "accepted"})
    store.create({"resourceType": "Observation", "status": "final", "code": {"text": "x"}})
    entries, total = store.type_history("Task")
    assert total == 3
    assert [(e["id"], e["meta"]["versionId"]) for e in entries] == [
        (first["id"], "2"),
        (second["id"], "1"),
        (first["id"], "1"),
    ]


@pytest.mark.parametrize(
    ("resource", "expression", "code"),
    [
        ({"resourceType": "Task", "intent": "order"}, "Task.status", "required"),
        (task(authoredOn="yesterday"), "Task.authoredOn", "value"),
        ({**task(), "for": {"reference": 7}}, "Task.for.reference", "value"),
        (task(input=[{"type": {"text": "x"}}]), "Task.input[0]", "value"),
        (task(colour="blue"), "Task.colour", "structure"),
    ],
)
def test_invalid_resource_is_400_naming_the_element(
    store: ResourceStore, resource: dict[str, Any], expression: str, code: str
) -> None:
    for write in (store.create, lambda r: store.update({**r, "id": "t1"})):
        with pytest.raises(FhirError) as info:
            write(resource)
        assert info.value.status == 400
        assert (info.value.issues[0].code, info.value.issues[0].expression) == (code, (expression,))
    with pytest.raises(FhirError) as info:
        store.read("Task", "t1")
    assert info.value.status == 404  # nothing was written


def test_unknown_resource_type_and_missing_resource_type_are_400(store: ResourceStore) -> None:
    for body in ({"resourceType": "Spaceship"}, {"status": "draft"}):
        with pytest.raises(FhirError) as info:
            store.create(body)
        assert info.value.status == 400
        assert info.value.issues[0].expression == ("resourceType",)


def _update_with_retry(store: ResourceStore, resource_id: str, marker: str) -> None:
    """A client doing optimistic locking right: read, change, If-Match; on 412 start over."""
    while True:
        current = store.read("Task", resource_id)
        identifiers = [*current.get("identifier", []), {"system": "urn:test", "value": marker}]
        try:
            store.update(
                {**current, "identifier": identifiers}, if_match=f'W/"{current["meta"]["versionId"]}"'
            )
            return
        except FhirError as exc:
            assert exc.status == 412


def test_concurrent_updates_lose_no_data(store: ResourceStore) -> None:
    created = store.create(task())
    threads = [
        threading.Thread(target=_update_with_retry, args=(store, created["id"], f"writer-{n}"))
        for n in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    final = valid(store.read("Task", created["id"]))
    assert sorted(i["value"] for i in final["identifier"]) == sorted(f"writer-{n}" for n in range(8))
    assert final["meta"]["versionId"] == "9"


def test_concurrent_blind_updates_each_get_their_own_version(store: ResourceStore) -> None:
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            store.update(task(id="shared", description=f"writer {n}"))
        except BaseException as exc:  # collected and asserted below, in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    entries, total = store.history("Task", "shared")
    assert total == 8
    assert sorted(e["description"] for e in entries) == sorted(f"writer {n}" for n in range(8))
    assert [e["meta"]["versionId"] for e in entries] == [str(v) for v in range(8, 0, -1)]


def test_upgrade_is_idempotent(engine: Engine) -> None:
    assert current_version(engine) == 0
    assert upgrade(engine) == len(MIGRATIONS)
    store = ResourceStore(engine)
    created = store.create(task())
    assert upgrade(engine) == len(MIGRATIONS)
    assert current_version(engine) == len(MIGRATIONS)
    assert store.read("Task", created["id"]) == created


def test_transaction_commits_together_or_not_at_all(store: ResourceStore) -> None:
    with store.transaction():
        first = store.create(task())
        second = store.update({**task(), "id": "t-in-tx"})
        assert store.read("Task", first["id"]) == first  # visible inside the transaction
    assert store.read("Task", "t-in-tx") == second.resource

    with pytest.raises(FhirError), store.transaction():
        store.update({**task(), "id": "t-rolled-back"})
        store.create({"resourceType": "Task", "status": "not-a-status", "intent": 7})
    with pytest.raises(FhirError) as info:
        store.read("Task", "t-rolled-back")
    assert info.value.status == 404
