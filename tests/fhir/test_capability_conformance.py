"""The CapabilityStatement, checked against behaviour over real HTTP (a real Orthanc, SQLite).

Both directions (FHIR R4 capabilitystatement.html: the statement describes what the server
*actually* does):
- everything claimed works: each interaction, search parameter (accepted under
  `Prefer: handling=strict` and filtering), `_include`/`_revinclude` and operation;
- everything that works is claimed: every R4 type interaction is probed on every type, and every
  system interaction on the base; the ones answering 2xx are exactly the ones listed, the others
  answer 404, 405 or 501.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fhir_facade.embedded import EmbeddedOrthanc
from fhir_facade.fhir.registry import registry
from tests.conftest import LiveServer, ok_json, serve, validate
from tests.dicom_factory import CORPUS

STRICT = {"Prefer": "handling=strict"}
MR_BRAIN = CORPUS["mueller_mr_brain"]
PATIENT = "Patient/P-1001"
STUDY = f"ImagingStudy/{MR_BRAIN.study_uid}"
TYPE_INTERACTIONS = (
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
)
SYSTEM_INTERACTIONS = ("transaction", "batch", "history-system", "search-system")
#: A value of each search type that no resource here has.
NO_MATCH = {
    "token": "no-such-code-zz",
    "date": "1801-01-01",
    "string": "zzz-no-such-text",
    "uri": "http://no-such.invalid/x",
    "number": "987654321",
}


@pytest.fixture(scope="module")
def server(loaded_orthanc: EmbeddedOrthanc) -> Iterator[LiveServer]:
    """Its own facade and store (the probes write and delete), with audit on so that AuditEvents
    exist to search."""
    with serve(
        {
            "dicomweb_url": loaded_orthanc.dicomweb_url,
            "orthanc_url": loaded_orthanc.url,
            "audit_enabled": True,
            # Subscriptions may name this (closed) port: created and probed, never delivered.
            "subscription_endpoints": ["http://127.0.0.1:9/"],
        }
    ) as live:
        yield live


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


def _create(http: httpx.Client, resource: dict[str, Any]) -> str:
    created = ok_json(http.post(f"/{resource['resourceType']}", json=resource), 201)
    return f"{created['resourceType']}/{created['id']}"


@pytest.fixture(scope="module")
def seeds(http: httpx.Client) -> dict[str, str]:
    """One resource of every type (`Type/id`), each stored one referring along every include path,
    so that includes and rev-includes have something to find."""
    device = _create(http, {"resourceType": "Device", "status": "active"})
    order = _create(
        http,
        {
            "resourceType": "ServiceRequest",
            "status": "active",
            "intent": "order",
            "code": {"text": "MR brain"},
            "subject": {"reference": PATIENT},
        },
    )
    parent = _create(http, {"resourceType": "Task", "status": "requested", "intent": "order"})
    task = _create(
        http,
        {
            "resourceType": "Task",
            "status": "requested",
            "intent": "order",
            "focus": {"reference": STUDY},
            "for": {"reference": PATIENT},
            "basedOn": [{"reference": order}],
            "owner": {"reference": device},
            "requester": {"reference": device},
            "partOf": [{"reference": parent}],
        },
    )
    observation = _create(
        http,
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "finding"},
            "subject": {"reference": PATIENT},
            "basedOn": [{"reference": order}],
            "partOf": [{"reference": STUDY}],
            "derivedFrom": [{"reference": STUDY}],
            "focus": [{"reference": STUDY}],
            "device": {"reference": device},
            "valueString": "no tumour",
        },
    )
    report = _create(
        http,
        {
            "resourceType": "DiagnosticReport",
            "status": "final",
            "code": {"text": "report"},
            "subject": {"reference": PATIENT},
            "basedOn": [{"reference": order}],
            "result": [{"reference": observation}],
        },
    )
    provenance = _create(
        http,
        {
            "resourceType": "Provenance",
            "target": [{"reference": report}],
            "recorded": "2026-12-04T10:00:00Z",
            "agent": [{"who": {"reference": device}}],
        },
    )
    communication = _create(
        http,
        {
            "resourceType": "Communication",
            "status": "completed",
            "subject": {"reference": PATIENT},
            "basedOn": [{"reference": order}],
            "partOf": [{"reference": task}],
            "sender": {"reference": device},
            "recipient": [{"reference": PATIENT}],
            "sent": "2026-12-04T10:05:00Z",
            "payload": [{"contentString": "The report is ready"}],
        },
    )
    subscription = _create(
        http,
        {
            "resourceType": "Subscription",
            "status": "requested",
            "reason": "probe",
            "criteria": "http://fhir-facade.org/fhir/SubscriptionTopic/task-status",
            "channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/hook"},
        },
    )
    seeds = {
        "Communication": communication,
        "Subscription": subscription,
        "Device": device,
        "ServiceRequest": order,
        "Task": task,
        "Observation": observation,
        "DiagnosticReport": report,
        "Provenance": provenance,
        "Patient": PATIENT,
        "ImagingStudy": STUDY,
        "Endpoint": "Endpoint/dicom-wado-rs",
    }
    statement = ok_json(http.get("/metadata"))
    for entry in statement["rest"][0]["resource"]:  # the rest: whatever the server already holds
        if entry["type"] not in seeds:
            found = ok_json(http.get(f"/{entry['type']}", params={"_count": 1}))
            assert found.get("entry"), f"no {entry['type']} to probe"
            resource = found["entry"][0]["resource"]
            seeds[entry["type"]] = f"{resource['resourceType']}/{resource['id']}"
    return seeds


@pytest.fixture(scope="module")
def statement(http: httpx.Client, seeds: dict[str, str]) -> dict[str, Any]:
    """The CapabilityStatement, read after seeding, validated against FHIR R4B."""
    body = ok_json(http.get("/metadata"))
    validate(body)
    return body


def _resources(statement: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["type"]: r for r in statement["rest"][0]["resource"]}


def _status(response: httpx.Response) -> int:
    """The status, after checking that an error is an OperationOutcome (never a bare 404 page)."""
    if response.status_code >= 400:
        assert response.json()["resourceType"] == "OperationOutcome", response.text
    return response.status_code


def _probe_type(http: httpx.Client, type_name: str, seed: str) -> dict[str, int]:
    """Every R4 type interaction, run once against `seed`, as its HTTP status."""
    found = http.get(f"/{seed}")
    status = {"read": _status(found)}
    current = found.json() if found.is_success else {"resourceType": type_name, "id": seed.split("/")[1]}
    version = current.get("meta", {}).get("versionId", "1")
    status["vread"] = _status(http.get(f"/{seed}/_history/{version}"))
    status["history-instance"] = _status(http.get(f"/{seed}/_history"))
    status["history-type"] = _status(http.get(f"/{type_name}/_history"))
    status["search-type"] = _status(http.get(f"/{type_name}"))
    status["update"] = _status(http.put(f"/{seed}", json=current))
    status["patch"] = _status(
        http.patch(
            f"/{seed}",
            content=b"[]",
            headers={"Content-Type": "application/json-patch+json"},
        )
    )
    new = copy.deepcopy(current)
    new.pop("id", None)
    new.pop("meta", None)
    created = http.post(f"/{type_name}", json=new)
    status["create"] = _status(created)
    # Delete what was just created where possible, so that the seeds stay for the other probes.
    doomed = f"{type_name}/{created.json()['id']}" if created.is_success else seed
    status["delete"] = _status(http.delete(f"/{doomed}"))
    return status


def test_every_type_interaction_that_works_is_claimed_and_only_those(
    http: httpx.Client, statement: dict[str, Any], seeds: dict[str, str]
) -> None:
    # Patient's versioned interactions are those of the Patients an EHR stores here (a DICOM-view
    # Patient has no versions): probe one of those.
    targets = {**seeds, "Patient": _create(http, {"resourceType": "Patient", "gender": "other"})}
    mismatches = {}
    for type_name, entry in _resources(statement).items():
        claimed = {i["code"] for i in entry.get("interaction", [])}
        status = _probe_type(http, type_name, targets[type_name])
        assert set(status) == set(TYPE_INTERACTIONS)
        for code, answer in status.items():
            assert answer < 500 or answer == 501, (type_name, code, answer)
            works = 200 <= answer < 300
            if works != (code in claimed) or not (works or answer in (404, 405, 501)):
                mismatches[(type_name, code)] = (answer, code in claimed)
    assert not mismatches, f"(type, interaction): (status, claimed): {mismatches}"


def test_every_system_interaction_that_works_is_claimed_and_only_those(
    http: httpx.Client, statement: dict[str, Any], seeds: dict[str, str]
) -> None:
    claimed = {i["code"] for i in statement["rest"][0].get("interaction", [])}
    transaction = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:5c8f5c4e-1b8e-4e53-9a36-6f0d7a0c1b11",
                "resource": {"resourceType": "Device", "status": "active"},
                "request": {"method": "POST", "url": "Device"},
            }
        ],
    }
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "GET", "url": seeds["Device"]}}],
    }
    answers = {
        "transaction": http.post("", json=transaction),
        "batch": http.post("", json=batch),
        "history-system": http.get("/_history"),
        "search-system": http.get("", params={"_id": seeds["Device"].split("/")[1]}),
    }
    worked = set()
    for code, response in answers.items():
        if _status(response) < 300:
            worked.add(code)
            kind = "transaction-response" if code == "transaction" else "batch-response"
            assert code not in ("transaction", "batch") or ok_json(response)["type"] == kind
        else:
            assert response.status_code in (404, 405, 501), (code, response.text)
    assert worked == claimed
    assert {"transaction", "batch"} <= worked  # what the server does, so the test cannot pass empty


def test_every_claimed_search_parameter_is_accepted_and_filters(
    http: httpx.Client, statement: dict[str, Any], seeds: dict[str, str]
) -> None:
    """Each parameter under strict handling (an unknown one would be 400) with a value nothing
    has: the total drops to 0 from a non-zero total without it (each type holds a seed), so a
    parameter that is accepted but ignored fails."""
    failures = {}
    for type_name, entry in _resources(statement).items():
        everything = ok_json(http.get(f"/{type_name}", params={"_summary": "count"}, headers=STRICT))
        assert everything["total"] > 0, type_name
        for param in entry.get("searchParam", []):
            value = NO_MATCH.get(param["type"], "")
            if param["type"] == "reference":
                # A fresh id per request: with audit on, the AuditEvent of one search names the
                # Patient it searched for, which a later search must not find.
                # A type the parameter may refer to (its R4 targets, the registry's facts).
                facts = registry()[type_name].param(param["name"])
                targets = facts.targets if facts else ()
                target = "Patient" if not targets or "Patient" in targets else targets[0]
                value = f"{target}/no-such-{type_name}-{param['name']}"
            response = http.get(
                f"/{type_name}", params={param["name"]: value, "_summary": "count"}, headers=STRICT
            )
            if response.status_code != 200 or response.json().get("total") != 0:
                failures[(type_name, param["name"])] = (response.status_code, response.text[:200])
    assert not failures, failures


def _references(resource: dict[str, Any]) -> set[str]:
    """Every `reference` anywhere in a resource."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("reference"), str):
                found.add(node["reference"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(resource)
    return found


def _search_with(
    http: httpx.Client, seed: str, name: str, value: str
) -> tuple[list[dict[str, Any]], set[str]]:
    """The matches and the Type/id of the included resources of a search for `seed` by _id."""
    type_name, resource_id = seed.split("/")
    bundle = ok_json(http.get(f"/{type_name}", params={"_id": resource_id, name: value}, headers=STRICT))
    entries = bundle.get("entry", [])
    matches = [e["resource"] for e in entries if e["search"]["mode"] == "match"]
    included = {
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in entries
        if e["search"]["mode"] == "include"
    }
    return matches, included


def test_every_claimed_include_follows_its_reference(
    http: httpx.Client, statement: dict[str, Any], seeds: dict[str, str]
) -> None:
    """Each searchInclude on the type's seed: at least one resource is included, and every one
    included is referenced by the match (the seeds refer along every include path)."""
    claimed = [(t, v) for t, r in _resources(statement).items() for v in r.get("searchInclude", [])]
    assert len(claimed) >= 10  # includes work for Task, ImagingStudy, ...: they must be listed
    for type_name, value in claimed:
        matches, included = _search_with(http, seeds[type_name], "_include", value)
        assert [f"{m['resourceType']}/{m['id']}" for m in matches] == [seeds[type_name]]
        assert included, value
        assert included <= _references(matches[0]), (value, included)


def test_every_claimed_revinclude_brings_the_referring_resources(
    http: httpx.Client, statement: dict[str, Any], seeds: dict[str, str]
) -> None:
    """Each searchRevInclude is accepted (strict) on the type's seed, and where a seed of the
    source type refers to it, that seed is included."""
    claimed = [(t, v) for t, r in _resources(statement).items() for v in r.get("searchRevInclude", [])]
    assert ("ImagingStudy", "Task:focus") in claimed and ("Patient", "ImagingStudy:patient") in claimed
    found_any = 0
    for type_name, value in claimed:
        _, included = _search_with(http, seeds[type_name], "_revinclude", value)
        source_type = value.split(":")[0]
        source = ok_json(http.get(f"/{seeds[source_type]}")) if source_type in seeds else {}
        if seeds[type_name] in _references(source) and seeds[source_type] in included:
            found_any += 1
        assert all(i.startswith(f"{source_type}/") for i in included), (value, included)
    assert found_any >= 5


def test_every_claimed_operation_exists_and_unclaimed_ones_do_not(
    http: httpx.Client, statement: dict[str, Any], seeds: dict[str, str]
) -> None:
    """A claimed operation's URL is routed (not 404/405/501); $analyze (off here) and the sync
    operations (no upstream here) are not claimed and answer 404/405 or 501."""
    claimed = {(t, o["name"]) for t, r in _resources(statement).items() for o in r.get("operation", [])} | {
        ("", o["name"]) for o in statement["rest"][0].get("operation", [])
    }
    for type_name, name in claimed:
        path = f"/{seeds[type_name]}/${name}" if type_name else f"/${name}"
        status = http.post(path, json={"resourceType": "Parameters"}).status_code
        if status == 404 and type_name:  # a type-level operation ($ai-performance, ADR 0034)
            status = http.post(f"/{type_name}/${name}", json={"resourceType": "Parameters"}).status_code
        assert status not in (404, 405, 501), (type_name, name)
    assert ("ImagingStudy", "analyze") not in claimed
    assert http.post(f"/{STUDY}/$analyze", json={"resourceType": "Parameters"}).status_code in (404, 405)
    assert ("", "sync-status") not in claimed
    assert http.get("/$sync-status").status_code == 501
