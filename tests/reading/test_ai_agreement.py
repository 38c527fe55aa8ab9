"""The radiologist's report beside the AI result (ADR 0034): the agreement Observation and its
Provenance written when a report is signed, and `$ai-performance`.

Real parts, driven like tests/reading/test_reading_workflow.py (its fixtures, imported: a real
Orthanc of its own for this module, the real `$analyze` with the shipped model on the demo brain,
the SQL store, REST through the app). The demo brain's AI class is SNOMED CT 281900007 "No
abnormality detected".
"""

from __future__ import annotations

from typing import Any

import httpx

from fhir_facade.reading.agreement import AGREEMENT_EXTENSION, AI_ASSESSMENT, compare
from fhir_facade.reading.codes import AMENDMENT_REASON_EXTENSION
from fhir_facade.reading.performance import tally
from tests.conftest import ok_json, validate
from tests.reading import test_reading_workflow as workflow
from tests.reading.test_reading_workflow import FHIR_JSON, LOINC, PATIENT_ID, STUDY_UID

# The reading workflow's fixtures (module scope: this module gets an Orthanc and a store of its own).
orthanc = workflow.orthanc
database_url = workflow.database_url
triaged = workflow.triaged
reading = workflow.reading
client = workflow.client

SNOMED = "http://snomed.info/sct"
RADLEX = "http://radlex.org"
AGREEMENT = f"{AI_ASSESSMENT}|ai-agreement"


def _signed(order_id: str, codes: list[tuple[str, str]], **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "18748-4"}], "text": "MR brain report"},
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "basedOn": [{"reference": f"ServiceRequest/{order_id}"}],
        "imagingStudy": [{"reference": f"ImagingStudy/{STUDY_UID}"}],
        "resultsInterpreter": [{"reference": "Practitioner/rad-c", "display": "Dr Carla Cortex"}],
        "conclusion": "Signed in the agreement test.",
        "conclusionCode": [{"coding": [{"system": s, "code": c}]} for s, c in codes],
        **extra,
    }


def _assessments(http: httpx.Client, report_id: str) -> list[dict[str, Any]]:
    bundle = ok_json(
        http.get("/Observation", params={"code": AGREEMENT, "focus": f"DiagnosticReport/{report_id}"})
    )
    found = [e["resource"] for e in bundle.get("entry", [])]
    return [o for o in found if o["focus"][0] == {"reference": f"DiagnosticReport/{report_id}"}]


def _verdict(observation: dict[str, Any]) -> str:
    return str(observation["valueCodeableConcept"]["coding"][0]["code"])


def _components(observation: dict[str, Any]) -> dict[str, Any]:
    return {c["code"]["coding"][0]["code"]: c for c in observation["component"]}


class TestCompare:
    def test_the_verdicts(self) -> None:
        normal, mass = (SNOMED, "281900007"), (SNOMED, "126952004")
        assert compare({normal}, {normal}) == "agree"
        assert compare({normal}, {mass}) == "disagree"
        assert compare({normal, mass}, {mass}) == "partial"
        assert compare({normal}, {normal, (RADLEX, "RID5")}) == "agree", "other systems are ignored"
        assert compare({normal}, {(RADLEX, "RID5")}) is None, "nothing comparable"
        assert compare(set(), {normal}) is None


class TestAgreement:
    def test_disagree_agree_stated_and_not_comparable(
        self, client: httpx.Client, triaged: dict[str, Any]
    ) -> None:
        ai = triaged["report"]
        order_id = triaged["order"]["id"]

        # 1. A radiologist's own report that calls a brain neoplasm: disagrees with "no abnormality".
        first = ok_json(
            client.post(
                "/DiagnosticReport", json=_signed(order_id, [(SNOMED, "126952004")]), headers=FHIR_JSON
            ),
            201,
        )
        (observation,) = _assessments(client, first["id"])
        validate(observation)
        assert _verdict(observation) == "disagree"
        assert observation["status"] == "final" and observation["partOf"] == [
            {"reference": f"ImagingStudy/{STUDY_UID}"}
        ]
        assert {"reference": f"DiagnosticReport/{ai['id']}"} in observation["focus"]
        assert observation["performer"] == [{"reference": "Practitioner/rad-c", "display": "Dr Carla Cortex"}]
        assert observation["derivedFrom"][0] == ai["result"][0], "the AI finding Observation"
        parts = _components(observation)
        assert parts["ai-finding"]["valueCodeableConcept"]["coding"][0]["code"] == "281900007"
        assert parts["ai-model"]["valueString"] == "brain-tumor-vgg16"
        assert parts["ai-model-version"]["valueString"]

        bundle = ok_json(client.get("/Provenance", params={"target": f"Observation/{observation['id']}"}))
        (provenance,) = [e["resource"] for e in bundle["entry"]]
        validate(provenance)
        assert provenance["entity"] == [
            {"role": "source", "what": {"reference": f"DiagnosticReport/{ai['id']}"}}
        ]
        assert provenance["target"][0]["reference"] == (
            f"DiagnosticReport/{first['id']}/_history/{first['meta']['versionId']}"
        )
        assert provenance["agent"][0]["who"]["reference"] == "Practitioner/rad-c"

        # 2. Signing the AI report itself, conclusion unchanged: agrees.
        current = ok_json(client.get(f"/DiagnosticReport/{ai['id']}"))
        assert current["status"] == "preliminary"
        signed_ai = {
            **current,
            "status": "final",
            "resultsInterpreter": [{"reference": "Practitioner/rad-c"}],
        }
        ok_json(client.put(f"/DiagnosticReport/{current['id']}", json=signed_ai, headers=FHIR_JSON))
        (observation,) = _assessments(client, current["id"])
        assert _verdict(observation) == "agree"

        # 3. RadLex only, no statement: nothing to compare, nothing written.
        radlex = ok_json(
            client.post("/DiagnosticReport", json=_signed(order_id, [(RADLEX, "RID5")]), headers=FHIR_JSON),
            201,
        )
        assert _assessments(client, radlex["id"]) == []

        # 4. RadLex, but the radiologist states "partial" (AGREEMENT_EXTENSION).
        stated = _signed(
            order_id,
            [(RADLEX, "RID5")],
            extension=[{"url": AGREEMENT_EXTENSION, "valueCode": "partial"}],
        )
        third = ok_json(client.post("/DiagnosticReport", json=stated, headers=FHIR_JSON), 201)
        (observation,) = _assessments(client, third["id"])
        assert _verdict(observation) == "partial"
        assert observation["method"]["text"] == "Stated by the radiologist"

        # 5. Assessed once, at signing: an amendment adds nothing.
        reason = {"url": AMENDMENT_REASON_EXTENSION, "valueAnnotation": {"text": "Typo."}}
        amended = {**first, "status": "amended", "extension": [reason]}
        ok_json(client.put(f"/DiagnosticReport/{first['id']}", json=amended, headers=FHIR_JSON))
        assert len(ok_json(client.get("/Observation", params={"code": AGREEMENT}))["entry"]) == 3

        # 6. $ai-performance counts them per model, version and AI class.
        for response in (
            client.get("/DiagnosticReport/$ai-performance"),
            client.post(
                "/DiagnosticReport/$ai-performance",
                json={"resourceType": "Parameters"},
                headers=FHIR_JSON,
            ),
        ):
            result = ok_json(response)
            (model,) = result["parameter"]
            parts = {p["name"]: p for p in model["part"] if p["name"] != "class"}
            assert parts["model"]["valueString"] == "brain-tumor-vgg16"
            (ai_class,) = [p for p in model["part"] if p["name"] == "class"]
            counts = {p["name"]: p.get("valueInteger") for p in ai_class["part"]}
            assert counts == {"code": None, "agree": 1, "disagree": 1, "partial": 1, "total": 3}
            (code,) = [p for p in ai_class["part"] if p["name"] == "code"]
            assert code["valueCoding"]["code"] == "281900007"

        statement = ok_json(client.get("/metadata"))
        (entry,) = [r for r in statement["rest"][0]["resource"] if r["type"] == "DiagnosticReport"]
        assert {
            "name": "ai-performance",
            "definition": ("http://fhir-facade.org/fhir/OperationDefinition/ai-performance"),
        } in entry["operation"]


class TestTally:
    def test_nothing_assessed_is_an_empty_parameters(self) -> None:
        assert validate(tally([])) and tally([]) == {"resourceType": "Parameters"}
