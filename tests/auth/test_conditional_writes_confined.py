"""Conditional writes through the authorization wrapper (FACADE_AUTH=smart, docs/adr/0012): with a
`patient/` token the conditional search is confined to the token's patient before it reaches the
store, and fifty identical parallel requests still store exactly one resource."""

from __future__ import annotations

import secrets

import httpx

from tests.auth.issuer import TestIssuer
from tests.concurrent_requests import PARALLEL, all_at_once, assert_one_created
from tests.conftest import LiveServer, ok_json

FHIR_JSON = {"Content-Type": "application/fhir+json"}
OWN = "P-1001"


async def test_confined_parallel_conditional_creates_and_updates_store_one(
    secured: LiveServer, issuer: TestIssuer
) -> None:
    system, value = "urn:test:confined-race", secrets.token_hex(4)
    criteria = f"identifier={system}|{value}"
    headers = {**FHIR_JSON, **issuer.headers("launch/patient patient/*.cruds", patient=OWN)}

    def body(n: int) -> dict[str, object]:
        return {
            "resourceType": "Observation",
            "status": "final",
            "identifier": [{"system": system, "value": value}],
            "code": {"text": "finding"},
            "subject": {"reference": f"Patient/{OWN}"},
            "valueString": f"request {n}",
        }

    async def create(client: httpx.AsyncClient, n: int) -> httpx.Response:
        return await client.post("Observation", json=body(n), headers={**headers, "If-None-Exist": criteria})

    async def update(client: httpx.AsyncClient, n: int) -> httpx.Response:
        return await client.put(f"Observation?{criteria}", json=body(n), headers=headers)

    resource_id = assert_one_created(await all_at_once([secured.base_url], create))
    updated = await all_at_once([secured.base_url], update)
    assert [r.status_code for r in updated] == [200] * PARALLEL, [r.text[:200] for r in updated][:3]
    assert {r.json()["id"] for r in updated} == {resource_id}

    admin = issuer.headers("system/*.rs")
    with httpx.Client(base_url=secured.base_url, timeout=30) as client:
        found = ok_json(client.get(f"Observation?{criteria}", headers=admin))
        assert found["total"] == 1
        history = ok_json(client.get(f"Observation/{resource_id}/_history", headers=admin))
        assert history["total"] == 1 + PARALLEL
