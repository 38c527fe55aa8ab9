"""Imaging orders as EHRs send them (LOINC, CPT, SNOMED CT or local procedure codes, no DCM modality
code) reach the modality: a real facade over HTTP writes the worklist item, a real Orthanc answers a
real modality query (dcmtk findscu -W). An order whose modality cannot be derived is stored with a
warning and a scheduling Task (ADR 0018); a site ConceptMap extends the catalogue."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from fhir_facade.embedded import EmbeddedOrthanc
from fhir_facade.worklist import WorklistFolder
from tests.conftest import LiveServer, ok_json
from tests.narrative_checks import narrative_text
from tests.worklist.conftest import facade_with_worklist_folder
from tests.worklist.test_findscu import ACSN, findscu

FHIR_JSON = {"Content-Type": "application/fhir+json"}
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
CPT = "http://www.ama-assn.org/go/cpt"
LOCAL = "http://hospital.example.org/fhir/CodeSystem/procedures"
IMAGING = {"coding": [{"system": SNOMED, "code": "363679005", "display": "Imaging"}]}
SCHEDULE = "http://fhir-facade.org/fhir/CodeSystem/task-code|schedule"

#: A site's own catalogue entry: a local code the bundled ConceptMap cannot know.
SITE_MAP: dict[str, Any] = {
    "resourceType": "ConceptMap",
    "id": "site-procedures",
    "url": "http://hospital.example.org/fhir/ConceptMap/site-procedures",
    "status": "active",
    "group": [
        {
            "source": LOCAL,
            "target": "http://dicom.nema.org/resources/ontology/DCM",
            "element": [
                {
                    "code": "MR-KNIE-L",
                    "display": "MRT Knie links",
                    "target": [{"code": "MR", "display": "Magnetic Resonance", "equivalence": "wider"}],
                }
            ],
        }
    ],
}


@pytest.fixture(scope="module")
def facade(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, EmbeddedOrthanc, Path]]:
    site_map = tmp_path_factory.mktemp("site-maps") / "ConceptMap-site-procedures.json"
    site_map.write_text(json.dumps(SITE_MAP), encoding="utf-8")
    with facade_with_worklist_folder(
        tmp_path_factory,
        "procedures",
        worklist_procedure_map=site_map,
        worklist_stations={"MR": "MR-SCANNER-1"},
    ) as running:
        yield running


def ehr_order(accession: str, coding: dict[str, str], text: str) -> dict[str, Any]:
    """An active imaging order as an EHR sends it: category Imaging, a procedure code, no DCM code."""
    return {
        "resourceType": "ServiceRequest",
        "identifier": [{"system": "urn:oid:1.2.3.4.5.7", "type": ACSN, "value": accession}],
        "status": "active",
        "intent": "order",
        "priority": "routine",
        "category": [IMAGING],
        "code": {"coding": [coding], "text": text},
        "subject": {
            "reference": f"Patient/PID-{accession}",
            "identifier": {"value": f"PID-{accession}"},
            "display": "Weber, Lena",
        },
        "occurrenceDateTime": "2026-12-07T08:15:00+01:00",
    }


MR_BRAIN = {"system": LOINC, "code": "24590-2", "display": "MR Brain"}


def client(server: LiveServer) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, timeout=30)


def test_loinc_mr_brain_order_becomes_an_mr_worklist_item(
    facade: tuple[LiveServer, EmbeddedOrthanc, Path], tmp_path: Path
) -> None:
    server, orthanc, worklists = facade
    order = ehr_order("LN-1", MR_BRAIN, "MR BRAIN")
    created = ok_json(client(server).post("/ServiceRequest", json=order, headers=FHIR_JSON), 201)

    (item,) = findscu(orthanc, tmp_path / "q", AccessionNumber="LN-1")
    step = item.ScheduledProcedureStepSequence[0]
    assert step.Modality == "MR"
    assert step.ScheduledStationAETitle == "MR-SCANNER-1"  # FACADE_WORKLIST_STATIONS
    assert item.RequestedProcedureDescription == "MR Brain"  # the catalogue's name
    # The file Orthanc serves carries the requested procedure code (one item, PS3.3 C.4.11).
    stored = pydicom.dcmread(WorklistFolder(worklists).path / f"{created['id']}.wl")
    (code,) = stored.RequestedProcedureCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("24590-2", "LN", "MR Brain")


def test_loinc_order_in_a_transaction_reaches_the_worklist(
    facade: tuple[LiveServer, EmbeddedOrthanc, Path], tmp_path: Path
) -> None:
    server, orthanc, _ = facade
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:5b0c1c52-7f0e-4a51-9c43-2f4a1e8e0001",
                "resource": ehr_order("LN-TX-1", MR_BRAIN, "MR BRAIN"),
                "request": {"method": "POST", "url": "ServiceRequest"},
            }
        ],
    }
    response = ok_json(client(server).post("/", json=bundle, headers=FHIR_JSON))
    (entry,) = response["entry"]
    assert entry["response"]["status"].startswith("201")
    assert "outcome" not in entry["response"]  # nothing to warn about

    (item,) = findscu(orthanc, tmp_path / "q", AccessionNumber="LN-TX-1")
    assert item.ScheduledProcedureStepSequence[0].Modality == "MR"
    assert item.RequestedProcedureDescription == "MR Brain"


@pytest.mark.parametrize(
    ("accession", "coding", "modality", "description"),
    [
        ("CPT-1", {"system": CPT, "code": "70551"}, "MR", "MRI brain without contrast"),
        ("CPT-2", {"system": CPT, "code": "71250"}, "CT", "CT chest without contrast"),
        ("SCT-1", {"system": SNOMED, "code": "303662009"}, "CT", "CT of intrathoracic structures"),
    ],
)
def test_cpt_and_snomed_orders_map_to_their_modality(
    facade: tuple[LiveServer, EmbeddedOrthanc, Path],
    tmp_path: Path,
    accession: str,
    coding: dict[str, str],
    modality: str,
    description: str,
) -> None:
    server, orthanc, _ = facade
    order = ehr_order(accession, coding, "as ordered")
    ok_json(client(server).post("/ServiceRequest", json=order, headers=FHIR_JSON), 201)
    (item,) = findscu(orthanc, tmp_path / "q", AccessionNumber=accession)
    assert item.ScheduledProcedureStepSequence[0].Modality == modality
    assert item.RequestedProcedureDescription == description


def scheduling_tasks(server: LiveServer, order_id: str) -> list[dict[str, Any]]:
    found = ok_json(
        client(server).get("/Task", params={"focus": f"ServiceRequest/{order_id}", "code": SCHEDULE})
    )
    return [e["resource"] for e in found.get("entry", [])]


def test_unknown_code_is_stored_with_a_warning_and_a_scheduling_task(
    facade: tuple[LiveServer, EmbeddedOrthanc, Path], tmp_path: Path
) -> None:
    server, orthanc, worklists = facade
    fhir = client(server)
    order = ehr_order("LOCAL-1", {"system": LOCAL, "code": "XR-THX-PED"}, "Thorax pädiatrisch")
    client_text = {
        "status": "additional",
        "div": '<div xmlns="http://www.w3.org/1999/xhtml">Thorax &amp; more</div>',
    }
    order["text"] = client_text
    prefer = {**FHIR_JSON, "Prefer": "return=OperationOutcome"}
    response = fhir.post("/ServiceRequest", json=order, headers=prefer)
    body = ok_json(response, 201)
    assert body["resourceType"] == "OperationOutcome"
    order_id = response.headers["Location"].split("/")[-3]
    (warning,) = [i for i in body["issue"] if i["severity"] == "warning"]
    assert warning["code"] == "processing"
    assert warning["details"]["coding"][0]["code"] == "modality_not_derived"
    assert warning["expression"] == ["ServiceRequest.code"]

    stored = ok_json(fhir.get(f"/ServiceRequest/{order_id}"))  # never lost
    assert stored["code"]["coding"][0]["code"] == "XR-THX-PED"
    assert stored["text"] == client_text  # a client's narrative is never overwritten (ADR 0019)
    (task,) = scheduling_tasks(server, order_id)
    assert task["status"] == "requested"
    assert task["intent"] == "order"
    assert task["for"] == {"reference": "Patient/PID-LOCAL-1"}
    assert "modality could not be derived" in task["description"]
    narrative_text(
        task,
        f"Schedule imaging order ServiceRequest/{order_id} for patient Weber, Lena (Patient/PID-LOCAL-1)",
        "XR-THX-PED",
        "Status requested",
    )
    assert f"Task/{task['id']}" in warning["diagnostics"]

    assert findscu(orthanc, tmp_path / "q", AccessionNumber="LOCAL-1") == []
    assert order_id not in WorklistFolder(worklists).list_ids()

    # Saving the order again adds no second Task; the default return is still the resource.
    again = ok_json(fhir.put(f"/ServiceRequest/{order_id}", json=stored, headers=FHIR_JSON))
    assert again["resourceType"] == "ServiceRequest"
    assert len(scheduling_tasks(server, order_id)) == 1


def test_unknown_code_in_a_transaction_warns_in_the_entry_outcome(
    facade: tuple[LiveServer, EmbeddedOrthanc, Path], tmp_path: Path
) -> None:
    server, orthanc, _ = facade
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:5b0c1c52-7f0e-4a51-9c43-2f4a1e8e0002",
                "resource": ehr_order("LOCAL-TX-1", {"system": LOCAL, "code": "US-UNKNOWN"}, "Sono"),
                "request": {"method": "POST", "url": "ServiceRequest"},
            }
        ],
    }
    response = ok_json(client(server).post("/", json=bundle, headers=FHIR_JSON))
    (entry,) = response["entry"]
    assert entry["response"]["status"].startswith("201")
    (issue,) = entry["response"]["outcome"]["issue"]
    assert (issue["severity"], issue["code"]) == ("warning", "processing")
    assert len(scheduling_tasks(server, entry["resource"]["id"])) == 1
    assert findscu(orthanc, tmp_path / "q", AccessionNumber="LOCAL-TX-1") == []


def test_site_concept_map_adds_a_local_code(
    facade: tuple[LiveServer, EmbeddedOrthanc, Path], tmp_path: Path
) -> None:
    server, orthanc, _ = facade
    fhir = client(server)
    order = ehr_order("SITE-1", {"system": LOCAL, "code": "MR-KNIE-L"}, "MRT Knie li")
    ok_json(fhir.post("/ServiceRequest", json=order, headers=FHIR_JSON), 201)
    (item,) = findscu(orthanc, tmp_path / "q", AccessionNumber="SITE-1")
    assert item.ScheduledProcedureStepSequence[0].Modality == "MR"
    assert item.RequestedProcedureDescription == "MRT Knie links"
    # The site's map is served beside the bundled one.
    assert ok_json(fhir.get("/ConceptMap/site-procedures"))["url"] == SITE_MAP["url"]
    assert ok_json(fhir.get("/ConceptMap/procedure-to-modality"))["group"]
