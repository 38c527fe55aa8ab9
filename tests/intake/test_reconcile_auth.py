"""Who may resolve a reconcile Task (ADR 0039, ADR 0009): a caller allowed to write the Task *and*
the target Patient. A real Orthanc receives the study by storescu; the facade runs in SMART
resource-server mode with a test issuer minting the tokens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhir_facade.embedded import EmbeddedOrthanc, free_port
from tests.auth.issuer import TestIssuer
from tests.conftest import ok_json, outcome, serve
from tests.intake.test_reconcile import (
    FHIR_JSON,
    MRN_SYSTEM,
    pacs_instances,
    reference_output,
    storescu,
    study,
    wait_for,
)

ADMIN = "system/*.cruds"
UID = "1.2.826.0.1.3680043.8.498.39.20"


@pytest.fixture(scope="module")
def issuer() -> Iterator[tuple[TestIssuer, int]]:
    port = free_port()
    test_issuer = TestIssuer(audience=f"http://127.0.0.1:{port}/fhir")
    yield test_issuer, port
    test_issuer.close()


@pytest.fixture(scope="module")
def http(
    pacs: EmbeddedOrthanc, issuer: tuple[TestIssuer, int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    test_issuer, port = issuer
    with (
        serve(
            {
                **test_issuer.facade_settings,
                "dicomweb_url": pacs.dicomweb_url,
                "orthanc_url": pacs.url,
                "watch_studies": True,
                "watch_poll_interval": 0.3,
                "task_modalities": ["MR"],
                "reading_enabled": False,
                "reconcile_require_known_patient": True,
                "data_dir": tmp_path_factory.mktemp("facade-data"),
            },
            port=port,
        ) as live,
        httpx.Client(base_url=f"{live.base_url}/", timeout=60, headers=FHIR_JSON) as client,
    ):
        yield client


def _task(http: httpx.Client, headers: dict[str, str]) -> dict[str, Any]:
    def found() -> list[dict[str, Any]]:
        bundle = ok_json(
            http.get("Task", params={"code": "reconcile", "focus": f"ImagingStudy/{UID}"}, headers=headers)
        )
        return [e["resource"] for e in bundle.get("entry", [])]

    (task,) = wait_for(found)
    return task


def test_only_a_caller_who_may_write_the_patient_resolves(
    pacs: EmbeddedOrthanc, http: httpx.Client, issuer: tuple[TestIssuer, int], tmp_path: Path
) -> None:
    test_issuer, _ = issuer
    admin = test_issuer.headers(ADMIN)
    patient = {
        "resourceType": "Patient",
        "id": "MRN-300",
        "identifier": [{"system": MRN_SYSTEM, "value": "MRN-300"}],
        "name": [{"family": "Recht", "given": ["Rita"]}],
    }
    ok_json(http.put("Patient/MRN-300", json=patient, headers=admin), 201)
    storescu(pacs, study(UID, "WALKIN-30", "Unbekannt^Frau"), tmp_path / "study")
    task = _task(http, admin)
    taken = ok_json(http.put(f"Task/{task['id']}", json={**task, "status": "in-progress"}, headers=admin))
    completed = {**taken, "status": "completed", "output": [reference_output("Patient/MRN-300")]}

    # Task and Patient read, but no right to write the Patient: 403, nothing changes.
    no_patient_write = test_issuer.headers("system/Task.cruds system/Patient.rs")
    body = outcome(http.put(f"Task/{task['id']}", json=completed, headers=no_patient_write), 403, "forbidden")
    assert "update on Patient" in body["issue"][0]["diagnostics"]
    # A token confined to the study's (old) patient may not name another patient (ADR 0009).
    confined = test_issuer.headers("patient/Task.cruds patient/Patient.cruds", patient="WALKIN-30")
    body = outcome(http.put(f"Task/{task['id']}", json=completed, headers=confined), 422, "processing")
    assert body["issue"][0]["details"]["coding"][0]["code"] == "unknown_reference"
    assert {i["PatientID"] for i in pacs_instances(pacs, UID)} == {"WALKIN-30"}
    assert ok_json(http.get(f"Task/{task['id']}", headers=admin))["status"] == "in-progress"

    allowed = test_issuer.headers("system/Task.cruds system/Patient.ru")
    done = ok_json(http.put(f"Task/{task['id']}", json=completed, headers=allowed))
    assert done["status"] == "completed"
    assert {i["PatientID"] for i in pacs_instances(pacs, UID)} == {"MRN-300"}
