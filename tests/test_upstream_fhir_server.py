"""The test upstream (tests/upstream_fhir/server.mjs: Medplum fhir-router 4.5.2 + MemoryRepository)
does what the upstream sync relies on, and these tests pin down where it differs from HAPI FHIR:

- update-as-create (PUT Type/id with a new id) is allowed but answers 200, not 201;
- versionIds are opaque UUIDs, not "1", "2", ...: a client must compare them, never count;
- a version conflict (If-Match with a stale version) is 412 precondition-failed;
- a deleted resource reads 404 (HAPI: 410); deleting it again is 404 (HAPI: 200);
- conditional update by identifier creates once, then updates; with an id in the body and no match it
  is refused with 400 (Medplum will not create with a client-assigned id there); 2+ matches are 412;
- transactions are all-or-nothing (our server.mjs adds the rollback: Medplum's MemoryRepository keeps
  the entries written before the failing one) and invalid resources are 400 (our server.mjs runs
  Medplum's validateResource, as Medplum's own server does);
- urn:uuid references are rewritten in transactions, but only lowercase ones: an uppercase
  urn:uuid is stored unresolved.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import ok_json, outcome, validate
from tests.upstream_fhir_server import UpstreamFhirServer

SYSTEM = "urn:oid:1.2.3.4.5"
FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpstreamFhirServer]:
    with UpstreamFhirServer(tmp_path_factory.mktemp("upstream-fhir")) as server:
        yield server


@pytest.fixture
def client(upstream: UpstreamFhirServer) -> Iterator[httpx.Client]:
    upstream.reset()
    with httpx.Client(base_url=upstream.base_url, headers=FHIR_JSON, timeout=10) as http:
        yield http


def patient(identifier: str, id_: str | None = None, **fields: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Patient",
        "identifier": [{"system": SYSTEM, "value": identifier}],
        **fields,
    }
    if id_ is not None:
        resource["id"] = id_
    return resource


def transaction(*entries: dict[str, Any], type_: str = "transaction") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": type_, "entry": list(entries)}


def put_entry(resource: dict[str, Any], url: str | None = None) -> dict[str, Any]:
    return {
        "resource": resource,
        "request": {"method": "PUT", "url": url or f"{resource['resourceType']}/{resource['id']}"},
    }


def version_of(resource: dict[str, Any]) -> str:
    version: str = resource["meta"]["versionId"]
    return version


def test_metadata_is_a_capability_statement(client: httpx.Client) -> None:
    body = ok_json(client.get("/metadata"))
    assert body["resourceType"] == "CapabilityStatement"
    assert body["fhirVersion"] == "4.0.1"


def test_put_by_id_creates_then_updates(client: httpx.Client) -> None:
    # Update-as-create: allowed, but 200 where HAPI (and FHIR http.html#update) say 201.
    first = client.put("/Patient/sync-p1", json=patient("MRN-1", "sync-p1"))
    created = ok_json(first, 200)
    assert created["id"] == "sync-p1"
    assert first.headers["etag"] == f'W/"{version_of(created)}"'
    assert "last-modified" in first.headers

    second = client.put("/Patient/sync-p1", json=patient("MRN-1", "sync-p1", gender="female"))
    updated = ok_json(second, 200)
    assert updated["gender"] == "female"
    assert version_of(updated) != version_of(created)  # opaque UUIDs: they change, never count
    uuid.UUID(version_of(updated))

    assert ok_json(client.get("/Patient/sync-p1"))["gender"] == "female"
    old = ok_json(client.get(f"/Patient/sync-p1/_history/{version_of(created)}"))
    assert "gender" not in old
    history = ok_json(client.get("/Patient/sync-p1/_history"))
    assert history["type"] == "history"
    assert [version_of(e["resource"]) for e in history["entry"]] == [
        version_of(updated),
        version_of(created),
    ]


def test_version_conflict_is_412(client: httpx.Client) -> None:
    current = ok_json(client.put("/Patient/sync-p2", json=patient("MRN-2", "sync-p2")))
    stale = client.put(
        "/Patient/sync-p2",
        json=patient("MRN-2", "sync-p2", gender="male"),
        headers={"If-Match": 'W/"not-the-current-version"'},
    )
    assert outcome(stale, 412, "processing")["id"] == "precondition-failed"
    fresh = client.put(
        "/Patient/sync-p2",
        json=patient("MRN-2", "sync-p2", gender="male"),
        headers={"If-Match": f'W/"{version_of(current)}"'},
    )
    assert ok_json(fresh)["gender"] == "male"


def test_conditional_update_by_identifier_creates_once_then_updates(client: httpx.Client) -> None:
    base = str(client.base_url).rstrip("/")
    url = f"/Patient?identifier={SYSTEM}|MRN-3"
    first = client.put(url, json=patient("MRN-3"))
    created = ok_json(first, 201)
    assert first.headers["location"].startswith(f"{base}/Patient/{created['id']}/_history/")

    second = client.put(url, json=patient("MRN-3", gender="other"))
    updated = ok_json(second, 200)
    assert updated["id"] == created["id"]
    assert version_of(updated) != version_of(created)

    found = ok_json(client.get("/Patient", params={"identifier": f"{SYSTEM}|MRN-3"}))
    assert found["type"] == "searchset"
    assert found["total"] == 1
    assert found["entry"][0]["resource"]["gender"] == "other"
    assert found["entry"][0]["fullUrl"] == f"{base}/Patient/{created['id']}"


def test_conditional_update_refusals(client: httpx.Client) -> None:
    # No match and an id in the body: Medplum refuses to create with a client-assigned id.
    refused = client.put(f"/Patient?identifier={SYSTEM}|MRN-4", json=patient("MRN-4", "sync-p4"))
    assert "client-assigned" in outcome(refused, 400, "invalid")["issue"][0]["details"]["text"]

    for id_ in ("dup-a", "dup-b"):
        ok_json(client.put(f"/Patient/{id_}", json=patient("MRN-DUP", id_)))
    ambiguous = client.put(f"/Patient?identifier={SYSTEM}|MRN-DUP", json=patient("MRN-DUP"))
    assert outcome(ambiguous, 412, "multiple-matches")["id"] == "multiple-matches"


def test_search_by_identifier_with_count(client: httpx.Client) -> None:
    for n in range(3):
        ok_json(client.put(f"/Patient/count-{n}", json=patient(f"MRN-C{n}", f"count-{n}")))
    ok_json(client.put("/Patient/other", json=patient("X", "other") | {"identifier": [{"value": "X"}]}))

    page = ok_json(client.get("/Patient", params={"identifier": f"{SYSTEM}|", "_count": "2"}))
    assert page["total"] == 3
    assert len(page["entry"]) == 2
    one = ok_json(client.get("/Patient", params={"identifier": f"{SYSTEM}|MRN-C1"}))
    assert [e["resource"]["id"] for e in one["entry"]] == ["count-1"]
    none = ok_json(client.get("/Patient", params={"identifier": f"{SYSTEM}|MRN-NONE"}))
    assert none["total"] == 0
    assert "entry" not in none


def test_delete_then_read_is_404_not_410(client: httpx.Client) -> None:
    ok_json(client.put("/Patient/sync-p5", json=patient("MRN-5", "sync-p5")))
    deleted = ok_json(client.delete("/Patient/sync-p5"), 200)
    assert deleted["resourceType"] == "OperationOutcome"

    outcome(client.get("/Patient/sync-p5"), 404, "not-found")
    outcome(client.get("/Patient/sync-p5/_history"), 404, "not-found")
    outcome(client.delete("/Patient/sync-p5"), 404, "not-found")  # HAPI: 200

    recreated = ok_json(client.put("/Patient/sync-p5", json=patient("MRN-5", "sync-p5")))
    assert recreated["id"] == "sync-p5"


def test_invalid_resource_is_400(client: httpx.Client) -> None:
    bad_type = client.put("/Patient/sync-p6", json=patient("MRN-6", "sync-p6", gender=7))
    assert outcome(bad_type, 400, "structure")["issue"][0]["expression"] == ["Patient.gender"]
    unknown = client.put("/Patient/sync-p6", json=patient("MRN-6", "sync-p6", colour="blue"))
    outcome(unknown, 400, "structure")
    mismatch = client.put("/Patient/other-id", json=patient("MRN-6", "sync-p6"))
    outcome(mismatch, 400, "invalid")
    outcome(client.get("/Patient/sync-p6"), 404, "not-found")


def test_transaction_of_puts_applies_all(client: httpx.Client) -> None:
    bundle = transaction(
        put_entry(patient("MRN-7", "tx-a")),
        put_entry(patient("MRN-8", "tx-b")),
        put_entry(patient("MRN-9"), url=f"Patient?identifier={SYSTEM}|MRN-9"),
    )
    body = ok_json(client.post("", json=bundle))
    assert body["type"] == "transaction-response"
    assert [e["response"]["status"] for e in body["entry"]] == ["200", "200", "201"]
    assert body["entry"][0]["response"]["location"] == "Patient/tx-a"
    for id_ in ("tx-a", "tx-b"):
        ok_json(client.get(f"/Patient/{id_}"))
    found = ok_json(client.get("/Patient", params={"identifier": f"{SYSTEM}|MRN-9"}))
    assert found["total"] == 1


def test_transaction_with_an_invalid_entry_applies_nothing(client: httpx.Client) -> None:
    before = ok_json(client.put("/Patient/tx-c", json=patient("MRN-10", "tx-c")))
    bundle = transaction(
        put_entry(patient("MRN-10", "tx-c", gender="female")),
        put_entry(patient("MRN-11"), url=f"Patient?identifier={SYSTEM}|MRN-11"),
        put_entry(patient("MRN-12", "tx-d", gender=7)),
    )
    failed = client.post("", json=bundle)
    assert outcome(failed, 400, "structure")["issue"][0]["expression"] == ["Patient.gender"]

    after = ok_json(client.get("/Patient/tx-c"))
    assert version_of(after) == version_of(before)
    assert "gender" not in after
    assert ok_json(client.get("/Patient", params={"identifier": f"{SYSTEM}|MRN-11"}))["total"] == 0
    outcome(client.get("/Patient/tx-d"), 404, "not-found")


def test_batch_applies_entries_independently(client: httpx.Client) -> None:
    bundle = transaction(
        put_entry(patient("MRN-13", "batch-a")),
        put_entry(patient("MRN-14", "batch-b", gender=7)),
        type_="batch",
    )
    body = ok_json(client.post("", json=bundle))
    assert body["type"] == "batch-response"
    assert [e["response"]["status"] for e in body["entry"]] == ["200", "400"]
    assert body["entry"][1]["response"]["outcome"]["issue"][0]["code"] == "structure"
    ok_json(client.get("/Patient/batch-a"))
    outcome(client.get("/Patient/batch-b"), 404, "not-found")


def test_transaction_rewrites_lowercase_urn_uuid_references(client: httpx.Client) -> None:
    patient_urn = f"urn:uuid:{uuid.uuid4()}"
    shouting_urn = f"urn:uuid:{str(uuid.uuid4()).upper()}"
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "finding"},
        "subject": {"reference": patient_urn},
        "focus": [{"reference": shouting_urn}],
    }
    bundle = transaction(
        # The reference comes before its target: the server resolves all identities first.
        {
            "fullUrl": f"urn:uuid:{uuid.uuid4()}",
            "resource": observation,
            "request": {"method": "POST", "url": "Observation"},
        },
        {
            "fullUrl": patient_urn,
            "resource": patient("MRN-15"),
            "request": {"method": "POST", "url": "Patient"},
        },
        {
            "fullUrl": shouting_urn,
            "resource": patient("MRN-16"),
            "request": {"method": "POST", "url": "Patient"},
        },
    )
    body = ok_json(client.post("", json=bundle))
    assert [e["response"]["status"] for e in body["entry"]] == ["201", "201", "201"]
    patient_location = body["entry"][1]["response"]["location"]
    assert patient_location.startswith("Patient/")

    stored = ok_json(client.get(f"/{body['entry'][0]['response']['location']}"))
    assert stored["subject"]["reference"] == patient_location
    assert stored["focus"][0]["reference"] == shouting_urn  # uppercase: left as it was


def test_fault_down_answers_503_with_retry_after(upstream: UpstreamFhirServer, client: httpx.Client) -> None:
    assert upstream.fault("down") == {"mode": "down"}
    for response in (client.get("/metadata"), client.put("/Patient/down", json=patient("D", "down"))):
        assert response.headers["retry-after"] == "1"
        outcome(response, 503, "transient")
    assert upstream.stats()["fault"] == {"mode": "down"}  # /admin is not affected

    upstream.fault("none")
    outcome(client.get("/Patient/down"), 404, "not-found")  # the PUT above was not applied


def test_fault_slow_delays_the_answer_not_the_work(
    upstream: UpstreamFhirServer, client: httpx.Client
) -> None:
    upstream.fault("slow", delay_ms=400)
    started = time.monotonic()
    ok_json(client.get("/metadata"))
    assert time.monotonic() - started >= 0.4

    with pytest.raises(httpx.ReadTimeout):
        client.put("/Patient/slow", json=patient("S", "slow"), timeout=0.1)
    upstream.fault("none")
    ok_json(client.get("/Patient/slow"))  # applied although the client gave up


def test_fault_reject_answers_422_for_matching_resources(
    upstream: UpstreamFhirServer, client: httpx.Client
) -> None:
    upstream.fault("reject", match="POISON")
    rejected = client.put("/Patient/r1", json=patient("POISON-1", "r1"))
    assert outcome(rejected, 422, "business-rule")["id"] == "business-rule"
    ok_json(client.put("/Patient/r2", json=patient("FINE-2", "r2")))
    ok_json(client.get("/Patient/r2"))

    # In a transaction the one rejected entry fails it all; in a batch only that entry.
    entries = (put_entry(patient("FINE-3", "r3")), put_entry(patient("POISON-4", "r4")))
    outcome(client.post("", json=transaction(*entries)), 422, "business-rule")
    outcome(client.get("/Patient/r3"), 404, "not-found")
    batch = ok_json(client.post("", json=transaction(*entries, type_="batch")))
    assert [e["response"]["status"] for e in batch["entry"]] == ["200", "422"]


def test_stats_count_fhir_requests_by_method(upstream: UpstreamFhirServer, client: httpx.Client) -> None:
    client.put("/Patient/st", json=patient("ST", "st"))
    client.get("/Patient/st")
    client.get("/Patient/missing")
    client.delete("/Patient/st")
    stats = upstream.stats()
    assert stats["total"] == 4
    assert stats["by_method"] == {"PUT": 1, "GET": 2, "DELETE": 1}
    assert stats["by_status"] == {"200": 3, "404": 1}
    assert stats["fault"] == {"mode": "none"}


@pytest.mark.parametrize(
    "body",
    [{"mode": "flaky"}, {"mode": "slow"}, {"mode": "slow", "delay_ms": -1}, {"mode": "reject", "match": ""}],
)
def test_bad_fault_settings_are_400(upstream: UpstreamFhirServer, body: dict[str, Any]) -> None:
    upstream.reset()
    response = httpx.post(f"{upstream.base_url.removesuffix('/fhir')}/admin/fault", json=body)
    assert response.status_code == 400
    assert upstream.stats()["fault"] == {"mode": "none"}


def test_responses_validate_as_fhir(client: httpx.Client) -> None:
    """Medplum adds `response.outcome` to every transaction-response entry; still valid FHIR."""
    body = client.post("", json=transaction(put_entry(patient("V", "v")))).json()
    validate(body)
    validate(body["entry"][0]["response"]["outcome"])
