"""Every consumer of the interaction pipeline sees each interaction once, whatever its path
(docs/adr/0022-interaction-pipeline.md): a REST write, a transaction entry, and a write the server
makes itself (the scheduling Task of an order without a modality).

The consumers are the real ones: the authorization stage (counted by a spy that calls it), the sync
outbox (its rows, read from the store), the order worklist (its `.wl` files, served by a real
Orthanc) and the audit (the AuditEvents it stored). A test subscriber counts the published events.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from fhir_facade.auth.enforcement import AuthorizationStage
from fhir_facade.embedded import EmbeddedOrthanc
from fhir_facade.fhir.pipeline import Call, InteractionContext, Origin, Proceed, ResourceChanged
from fhir_facade.store.schema import OutboxEntry
from fhir_facade.worklist import WorklistFolder
from tests.conftest import LiveServer, ok_json
from tests.worklist.conftest import facade_with_worklist_folder
from tests.worklist.test_procedure_orders import FHIR_JSON, LOCAL, MR_BRAIN, ehr_order

Seen = Counter[tuple[str, str, str, str]]  # (origin, kind, type, id or "")


@pytest.fixture(scope="module")
def running(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LiveServer, EmbeddedOrthanc, Path, Seen, Seen]]:
    """The facade with audit, worklist and an upstream to sync to (never reached: the worker runs
    out of process, so outbox rows stay to be counted); spies on authorization and the bus."""
    authorized: Seen = Counter()
    published: Seen = Counter()
    with facade_with_worklist_folder(
        tmp_path_factory,
        "pipeline",
        audit_enabled=True,
        fhir_upstream_url="http://127.0.0.1:9/fhir",
        sync_in_process=False,
    ) as (server, orthanc, worklists):
        pipeline = server.app.state.pipeline
        (stage,) = [s for s in pipeline.stages if isinstance(s, AuthorizationStage)]
        real_around = stage.around

        async def counting_around(context: InteractionContext, call: Call, proceed: Proceed) -> Any:
            result = await real_around(context, call, proceed)
            resource_id = context.resource_id or _id_of(result)
            authorized[(context.origin.value, context.kind.value, context.resource_type, resource_id)] += 1
            return result

        stage.around = counting_around  # type: ignore[method-assign]

        async def count(event: ResourceChanged) -> None:
            key = (event.context.origin.value, event.change.value, event.resource_type, event.resource_id)
            published[key] += 1

        pipeline.bus.subscribe(ResourceChanged, count)
        yield server, orthanc, worklists, authorized, published


def _id_of(result: Any) -> str:
    resource = getattr(result, "resource", result)
    return str(resource.get("id", "")) if isinstance(resource, dict) else ""


def outbox_rows(server: LiveServer, resource_type: str, resource_id: str) -> int:
    table = OutboxEntry.__table__  # type: ignore[attr-defined]
    query = select(func.count()).where(
        table.c.resource_type == resource_type, table.c.resource_id == resource_id
    )
    with server.app.state.store.engine.connect() as connection:
        return int(connection.execute(query).scalar_one())


def audit_events_naming(server: LiveServer, reference: str, expected: int) -> list[dict[str, Any]]:
    """The stored AuditEvents whose entity is `reference`, once `expected` of them are there (the
    recorder writes after the answer) and a moment more has shown no further one comes."""
    deadline = time.monotonic() + 10
    with httpx.Client(base_url=server.base_url, timeout=30) as fhir:
        while True:
            bundle = ok_json(fhir.get("/AuditEvent", params={"entity": reference, "_count": "50"}))
            found = [e["resource"] for e in bundle.get("entry", [])]
            if len(found) >= expected or time.monotonic() > deadline:
                time.sleep(0.5)
                bundle = ok_json(fhir.get("/AuditEvent", params={"entity": reference, "_count": "50"}))
                return [e["resource"] for e in bundle.get("entry", [])]
            time.sleep(0.1)


def test_a_rest_write_is_seen_once_by_each_consumer(
    running: tuple[LiveServer, EmbeddedOrthanc, Path, Seen, Seen],
) -> None:
    server, _, worklists, authorized, published = running
    with httpx.Client(base_url=server.base_url, timeout=30) as fhir:
        created = ok_json(
            fhir.post("/ServiceRequest", json=ehr_order("PIPE-REST", MR_BRAIN, "MR"), headers=FHIR_JSON), 201
        )
    order_id = created["id"]
    assert authorized[("rest", "create", "ServiceRequest", order_id)] == 1
    assert published[("rest", "create", "ServiceRequest", order_id)] == 1
    assert outbox_rows(server, "ServiceRequest", order_id) == 1
    assert WorklistFolder(worklists).list_ids().count(order_id) == 1
    (event,) = audit_events_naming(server, f"ServiceRequest/{order_id}", 1)
    assert event["subtype"][0]["code"] == "create"


def test_a_transaction_entry_is_seen_once_by_each_consumer(
    running: tuple[LiveServer, EmbeddedOrthanc, Path, Seen, Seen],
) -> None:
    server, _, worklists, authorized, published = running
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:0c2b7a8e-1d3f-4b5a-9c6d-7e8f9a0b1c2d",
                "resource": ehr_order("PIPE-TX", MR_BRAIN, "MR"),
                "request": {"method": "POST", "url": "ServiceRequest"},
            }
        ],
    }
    with httpx.Client(base_url=server.base_url, timeout=30) as fhir:
        (entry,) = ok_json(fhir.post("/", json=bundle, headers=FHIR_JSON))["entry"]
    order_id = entry["resource"]["id"]
    entry_origin = Origin.BUNDLE_ENTRY.value
    # A transaction's create runs as an update-as-create under the id it was assigned (ADR 0012).
    assert sum(n for key, n in authorized.items() if key[3] == order_id) == 1
    assert authorized[(entry_origin, "update", "ServiceRequest", order_id)] == 1
    assert published[(entry_origin, "create", "ServiceRequest", order_id)] == 1
    assert outbox_rows(server, "ServiceRequest", order_id) == 1
    assert WorklistFolder(worklists).list_ids().count(order_id) == 1
    (event,) = audit_events_naming(server, f"ServiceRequest/{order_id}", 1)
    assert "bundle-entry" in event["outcomeDesc"]


def test_a_write_the_server_makes_is_seen_once_by_each_consumer(
    running: tuple[LiveServer, EmbeddedOrthanc, Path, Seen, Seen],
) -> None:
    server, _, worklists, authorized, published = running
    order = ehr_order("PIPE-INT", {"system": LOCAL, "code": "NOT-IN-CATALOGUE"}, "Unbekannt")
    with httpx.Client(base_url=server.base_url, timeout=30) as fhir:
        order_id = ok_json(fhir.post("/ServiceRequest", json=order, headers=FHIR_JSON), 201)["id"]
        tasks = ok_json(fhir.get("/Task", params={"focus": f"ServiceRequest/{order_id}"}))
    (task,) = [e["resource"] for e in tasks["entry"]]
    internal = Origin.INTERNAL.value
    assert authorized[(internal, "create", "Task", task["id"])] == 1
    assert published[(internal, "create", "Task", task["id"])] == 1
    assert outbox_rows(server, "Task", task["id"]) == 1
    assert order_id not in WorklistFolder(worklists).list_ids()
    (event,) = audit_events_naming(server, f"Task/{task['id']}", 1)
    assert "internal" in event["outcomeDesc"]
    assert event["agent"][0]["who"]["display"] == "fhir-facade (the server itself)"


def test_a_communication_is_synced_and_audited_like_every_stored_type(
    running: tuple[LiveServer, EmbeddedOrthanc, Path, Seen, Seen],
) -> None:
    """Communication was added as registry data only (docs/adr/0023): the outbox and the audit
    take it with no code of theirs naming it."""
    server, _, _, authorized, published = running
    message = {
        "resourceType": "Communication",
        "status": "completed",
        "subject": {"reference": "Patient/PIPE-COMM"},
        "payload": [{"contentString": "Your report is ready"}],
    }
    with httpx.Client(base_url=server.base_url, timeout=30) as fhir:
        created = ok_json(fhir.post("/Communication", json=message, headers=FHIR_JSON), 201)
    assert authorized[("rest", "create", "Communication", created["id"])] == 1
    assert published[("rest", "create", "Communication", created["id"])] == 1
    assert outbox_rows(server, "Communication", created["id"]) == 1
    (event,) = audit_events_naming(server, f"Communication/{created['id']}", 1)
    assert event["subtype"][0]["code"] == "create"
