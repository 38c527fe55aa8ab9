"""End to end: an imaging order POSTed to the facade becomes a worklist item that a real modality
query (dcmtk findscu -W) finds in Orthanc; revoking or deleting the order removes it; an order the
modality could not run (no start time) is refused with 422 before anything is stored."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhir_facade.embedded import EmbeddedOrthanc
from tests.conftest import LiveServer, ok_json
from tests.worklist.conftest import facade_with_worklist_folder
from tests.worklist.test_findscu import findscu, order

FHIR_JSON = {"Content-Type": "application/fhir+json"}


@pytest.fixture(scope="module")
def facade_with_worklist(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LiveServer, EmbeddedOrthanc]]:
    with facade_with_worklist_folder(tmp_path_factory, "orders") as (server, orthanc, _):
        yield server, orthanc


def new_order(accession: str, modality: str = "MR") -> dict[str, Any]:
    resource = order("placeholder", accession, modality, "2024-06-03T08:15:00+02:00", f"PID-{accession}")
    resource.pop("id")
    resource["subject"]["display"] = "Weber, Lena"
    return resource


def test_order_lifecycle_in_the_worklist(
    facade_with_worklist: tuple[LiveServer, EmbeddedOrthanc], tmp_path: Path
) -> None:
    server, orthanc = facade_with_worklist
    fhir = httpx.Client(base_url=server.base_url, timeout=30)
    created = ok_json(fhir.post("/ServiceRequest", json=new_order("ACC-E2E-1"), headers=FHIR_JSON), 201)
    ok_json(fhir.post("/ServiceRequest", json=new_order("ACC-E2E-2", "CT"), headers=FHIR_JSON), 201)

    (item,) = findscu(orthanc, tmp_path / "one", AccessionNumber="ACC-E2E-1")
    assert item.PatientID == "PID-ACC-E2E-1"
    step = item.ScheduledProcedureStepSequence[0]
    assert step.Modality == "MR"
    assert (step.ScheduledProcedureStepStartDate, step.ScheduledProcedureStepStartTime[:4]) == (
        "20240603",
        "0815",
    )
    assert len(findscu(orthanc, tmp_path / "all")) == 2

    revoked = {**created, "status": "revoked"}
    ok_json(fhir.put(f"/ServiceRequest/{created['id']}", json=revoked, headers=FHIR_JSON))
    assert findscu(orthanc, tmp_path / "revoked", AccessionNumber="ACC-E2E-1") == []

    other = ok_json(fhir.get("/ServiceRequest", params={"identifier": "urn:oid:1.2.3.4.5.7|ACC-E2E-2"}))
    assert fhir.delete(f"/ServiceRequest/{other['entry'][0]['resource']['id']}").status_code == 204
    assert findscu(orthanc, tmp_path / "deleted") == []


def test_order_without_start_is_422_and_not_stored(
    facade_with_worklist: tuple[LiveServer, EmbeddedOrthanc],
) -> None:
    # An order whose modality is known but that the modality cannot run (no start time for
    # ScheduledProcedureStepStartDate, Type 1) is refused before anything is stored. An order whose
    # modality cannot be derived is stored with a scheduling Task instead (test_procedure_orders.py).
    server, _ = facade_with_worklist
    fhir = httpx.Client(base_url=server.base_url, timeout=30)
    bad = new_order("ACC-E2E-3")
    del bad["occurrenceDateTime"]
    body = ok_json(fhir.post("/ServiceRequest", json=bad, headers=FHIR_JSON), 422)
    assert body["issue"][0]["code"] == "required"
    assert body["issue"][0]["expression"] == ["ServiceRequest.occurrence"]
    found = ok_json(fhir.get("/ServiceRequest", params={"identifier": "urn:oid:1.2.3.4.5.7|ACC-E2E-3"}))
    assert found["total"] == 0
