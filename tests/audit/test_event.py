"""The AuditEvent builder and the request classifier, without a server: who called (from an
Access as the SMART dependency builds it), what they did, how it ended; every event valid R4."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fhir_facade.audit import audit_event, audit_outcome, describe_interaction, is_audited
from fhir_facade.audit.authentication import authentication_event
from fhir_facade.audit.event import CLIENT_ID_SYSTEM, CORRELATION_ENTITY_TYPE, CORRELATION_IDENTIFIER_TYPE
from fhir_facade.audit.interaction import needs_body
from fhir_facade.auth.access import Access
from fhir_facade.auth.scopes import parse_scopes
from tests.conftest import validate
from tests.narrative_checks import narrative_text

STARTED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
BASE = "https://facade.example/fhir"
ISSUER = "https://facade.example/auth"


def event_for(
    method: str,
    path: str,
    query: str = "",
    *,
    status: int | None = 200,
    access: Access | None = None,
    created: str | None = None,
    body: bytes | None = None,
) -> dict[str, Any]:
    event = audit_event(
        describe_interaction(method, path, query, body),
        status=status,
        access=access,
        client_address="10.1.2.3",
        correlation_id="corr-1",
        site="https://facade.example",
        started=STARTED,
        ended=STARTED + timedelta(milliseconds=25),
        created=created,
        subject_system=ISSUER,
        base_url=BASE,
    )
    validate(event)
    return event


def clinician() -> Access:
    return Access(
        parse_scopes("openid fhirUser launch/patient patient/Observation.rs user/ImagingStudy.rs"),
        client_id="viewer-app",
        subject="u-42",
        fhir_user=f"{BASE}/Practitioner/p-7",
        patient="P-1001",
        token_id="jti-1",
    )


def entity_refs(event: dict[str, Any]) -> list[str]:
    return [e["what"]["reference"] for e in event.get("entity", []) if "reference" in e.get("what", {})]


def test_a_user_of_an_app_with_a_patient_in_context() -> None:
    event = event_for("GET", "/fhir/Observation/o-1", access=clinician())
    client, user = event["agent"]
    assert client["who"]["identifier"] == {"system": CLIENT_ID_SYSTEM, "value": "viewer-app"}
    assert client["requestor"] is True
    assert client["network"] == {"address": "10.1.2.3", "type": "2"}
    assert user["who"] == {"reference": "Practitioner/p-7"}, "fhirUser on this server, made relative"
    assert user["requestor"] is False and user["altId"] == "u-42" and user["policy"] == ["jti-1"]
    patient = next(e for e in event["entity"] if e["what"].get("reference") == "Patient/P-1001")
    assert patient["role"] == {
        "system": "http://terminology.hl7.org/CodeSystem/object-role",
        "code": "1",
        "display": "Patient",
    }
    assert entity_refs(event) == ["Observation/o-1", "Patient/P-1001"]
    assert event["recorded"] == "2026-03-01T12:00:00.025+00:00"
    assert event["period"]["start"] == "2026-03-01T12:00:00.000+00:00"


def test_a_user_without_fhir_user_reference_and_a_backend_service() -> None:
    person = Access(parse_scopes("user/*.rs"), client_id="app", subject="alice", fhir_user=None)
    _, user = event_for("GET", "/fhir/Task", access=person)["agent"]
    assert user["who"] == {"identifier": {"system": ISSUER, "value": "alice"}}
    backend = Access(parse_scopes("system/*.rs"), client_id="sync", subject="sync")
    (client,) = event_for("GET", "/fhir/Task", access=backend)["agent"]
    assert client["who"]["identifier"]["value"] == "sync"
    patient_user = Access(parse_scopes("patient/*.rs"), client_id="app", subject="p", fhir_user="Patient/P-9")
    event = event_for("GET", "/fhir/Observation", "code=x", access=patient_user)
    assert event["agent"][1]["who"] == {"reference": "Patient/P-9"}, "searchable as patient=P-9"


@pytest.mark.parametrize(
    ("access", "status", "name"),
    [
        (None, 401, "unauthenticated (no valid access token)"),
        (Access.unrestricted(), 200, "unauthenticated (FACADE_AUTH=none)"),
        (None, 404, "unauthenticated (no access token was checked)"),
    ],
)
def test_unauthenticated_requests_record_the_address(access: Access | None, status: int, name: str) -> None:
    event = event_for("GET", "/fhir/Observation/o-1", status=status, access=access)
    (agent,) = event["agent"]
    assert agent["name"] == name
    assert agent["requestor"] is True
    assert agent["network"]["address"] == "10.1.2.3"


def test_a_refusal_is_a_minor_failure_with_the_reason() -> None:
    event = event_for("GET", "/fhir/Observation/o-1", status=403, access=clinician())
    assert event["outcome"] == "4"
    assert event["outcomeDesc"] == "GET /fhir/Observation/o-1: 403 Forbidden"


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, "0"),
        (201, "0"),
        (204, "0"),
        (304, "0"),
        (400, "4"),
        (404, "4"),
        (500, "8"),
        (503, "8"),
        (None, "12"),
    ],
)
def test_outcome_codes(status: int | None, outcome: str) -> None:
    assert audit_outcome(status) == outcome


def test_the_correlation_id_is_a_system_object_entity() -> None:
    event = event_for("GET", "/fhir/Task/t-1")
    (entity,) = [e for e in event["entity"] if e["what"].get("identifier", {}).get("value") == "corr-1"]
    assert entity["type"] == CORRELATION_ENTITY_TYPE
    assert entity["what"]["identifier"]["type"] == CORRELATION_IDENTIFIER_TYPE


#: R4 valueset-audit-entity-type.html, the (extensible) binding of AuditEvent.entity.type.
AUDIT_ENTITY_TYPES = {"http://terminology.hl7.org/CodeSystem/audit-entity-type": {"1", "2", "3", "4"}}
RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"


def test_every_entity_type_is_in_the_r4_value_set() -> None:
    """AuditEvent.entity.type used to carry BALP's BasicAuditEntityType#XrequestId, a code outside
    R4's audit-entity-type value set (audit-entity-type 1-4 and the resource types)."""
    events = [
        event_for("GET", "/fhir/Task/t-1", access=clinician()),
        event_for("GET", "/fhir/Observation", "patient=P-1", access=clinician()),
        event_for("POST", "/fhir/ImagingStudy/1.2.3/$analyze", status=200),
        event_for("GET", "/dicom-web/studies/1.2.3", status=200),
        authentication_event(
            "sign-in",
            description="bad password",
            username="alice",
            client_id="app",
            client_address="10.1.2.3",
            correlation_id="corr-2",
            site="https://facade.example",
            issuer=ISSUER,
            moment=STARTED,
        ),
    ]
    types = [entity["type"] for event in events for entity in event["entity"]]
    assert len(types) >= 8
    for coding in types:
        if coding["system"] == RESOURCE_TYPES:
            assert coding["code"][0].isupper() and coding["code"].isalpha(), coding
        else:
            assert coding["code"] in AUDIT_ENTITY_TYPES[coding["system"]], coding


def test_a_create_names_what_it_created() -> None:
    event = event_for("POST", "/fhir/Task", status=201, created="Task/new-1")
    assert (event["action"], event["subtype"][0]["code"]) == ("C", "create")
    assert entity_refs(event) == ["Task/new-1"]


def test_analyze_is_an_operation_on_the_study() -> None:
    event = event_for("POST", "/fhir/ImagingStudy/1.2.3/$analyze", status=200)
    assert (event["action"], event["subtype"][0]["code"]) == ("E", "operation")
    assert entity_refs(event) == ["ImagingStudy/1.2.3"]
    operation = next(e for e in event["entity"] if e.get("name"))
    assert operation["name"] == "$analyze"
    assert operation["type"]["code"] == "OperationDefinition"
    job = event_for("GET", "/fhir/$analyze-jobs/t-9", status=202)
    assert entity_refs(job) == ["Task/t-9"]
    assert next(e for e in job["entity"] if e.get("name"))["name"] == "$analyze-jobs"


def test_deleting_a_study_is_the_dicom_study_deleted_event() -> None:
    """PS3.15 A.5.3.5: a PACS administrator's audit search looks for DCM 110105; other deletes stay
    RESTful operations."""
    study = event_for("DELETE", "/fhir/ImagingStudy/1.2.840.113619.2.1")
    assert study["type"] == {
        "system": "http://dicom.nema.org/resources/ontology/DCM",
        "code": "110105",
        "display": "DICOM Study Deleted",
    }
    assert (study["action"], study["subtype"][0]["code"]) == ("D", "delete")
    assert event_for("DELETE", "/fhir/Observation/o-1")["type"]["code"] == "rest"


def test_dicomweb_query_export_import() -> None:
    uid = "1.2.840.113619.2.1"
    query = event_for("GET", "/dicom-web/studies", "PatientID=P-1001&includefield=all")
    assert query["type"] == {
        "system": "http://dicom.nema.org/resources/ontology/DCM",
        "code": "110112",
        "display": "Query",
    }
    assert query["action"] == "E"
    (entity,) = [e for e in query["entity"] if "query" in e]
    assert base64.b64decode(entity["query"]).decode() == "studies?PatientID=P-1001&includefield=all"

    export = event_for("GET", f"/dicom-web/studies/{uid}/series/1.2/instances/1.2.3")
    assert (export["type"]["code"], export["action"]) == ("110106", "R")
    study = next(
        e for e in export["entity"] if "identifier" in e["what"] and e["what"]["identifier"].get("system")
    )
    assert study["what"]["identifier"]["value"] == f"urn:oid:{uid}"

    stow = event_for("POST", f"/dicom-web/studies/{uid}")
    assert (stow["type"]["code"], stow["action"]) == ("110107", "C")
    within = event_for("GET", f"/dicom-web/studies/{uid}/series")
    assert within["type"]["code"] == "110112"


@pytest.mark.parametrize(
    ("method", "path", "query", "subtype", "action", "targets"),
    [
        ("GET", "/fhir/Patient/P-1", "", "read", "R", ("Patient/P-1",)),
        ("HEAD", "/fhir/Patient/P-1", "", "read", "R", ("Patient/P-1",)),
        ("GET", "/fhir/Task/t/_history/2", "", "vread", "R", ("Task/t/_history/2",)),
        ("GET", "/fhir/Task/t/_history", "", "history-instance", "R", ("Task/t",)),
        ("GET", "/fhir/Task/_history", "", "history-type", "R", ()),
        ("GET", "/fhir/_history", "", "history-system", "R", ()),
        ("GET", "/fhir/Task", "status=ready", "search-type", "R", ()),
        ("POST", "/fhir/Task/_search", "", "search-type", "R", ()),
        ("GET", "/fhir", "_type=Task", "search-system", "R", ()),
        ("POST", "/fhir/Task", "", "create", "C", ()),
        ("PUT", "/fhir/Task/t", "", "update", "U", ("Task/t",)),
        ("PUT", "/fhir/Task", "identifier=x", "update", "U", ()),
        ("PATCH", "/fhir/Task/t", "", "patch", "U", ("Task/t",)),
        ("DELETE", "/fhir/Task/t", "", "delete", "D", ("Task/t",)),
        ("GET", "/fhir/$sync-status", "", "operation", "E", ()),
        ("POST", "/fhir/$sync-replay", "", "operation", "E", ()),
        ("DELETE", "/fhir/$analyze-jobs/t-1", "", "operation", "E", ("Task/t-1",)),
        ("GET", "/fhir/Task/not a valid id", "", "read", "R", ()),
        ("GET", "/fhir/lowercase/x", "", "read", "R", ()),
    ],
)
def test_interactions(
    method: str, path: str, query: str, subtype: str, action: str, targets: tuple[str, ...]
) -> None:
    interaction = describe_interaction(method, path, query)
    assert (interaction.subtype, interaction.action, interaction.targets) == (subtype, action, targets)


def test_bundles_and_posted_searches_are_read_from_the_body() -> None:
    assert (
        needs_body("POST", "/fhir")
        and needs_body("POST", "/fhir/")
        and needs_body("POST", "/fhir/Task/_search")
    )
    assert not needs_body("POST", "/fhir/Task") and not needs_body("GET", "/fhir")
    assert (
        describe_interaction("POST", "/fhir", "", b'{"resourceType":"Bundle","type":"transaction"}').subtype
        == "transaction"
    )
    assert (
        describe_interaction("POST", "/fhir", "", b'{"resourceType":"Bundle","type":"batch"}').subtype
        == "batch"
    )
    assert describe_interaction("POST", "/fhir", "", b"not json").subtype == "batch"
    # A hostile body (refused with 400 by the parser's limits) is still described, hence audited.
    assert describe_interaction("POST", "/fhir", "", b"[" * 5000 + b"]" * 5000).subtype == "batch"
    assert describe_interaction("POST", "/fhir", "", b"9" * 5000).subtype == "batch"
    search = describe_interaction(
        "POST", "/fhir/Observation/_search", "_count=5", b"patient=Patient/P-1&code=x"
    )
    assert search.query == "Observation?_count=5&patient=Patient%2FP-1&code=x"
    assert search.patients == ("P-1",)


def test_patients_named_by_search_parameters() -> None:
    assert describe_interaction("GET", "/fhir/Observation", "patient=P-1,P-2").patients == ("P-1", "P-2")
    assert describe_interaction("GET", "/fhir/Observation", "subject=Patient/P-3").patients == ("P-3",)
    assert describe_interaction("GET", "/fhir/Observation", "subject=Group/g").patients == ()
    assert describe_interaction("GET", "/fhir/Observation", "subject:Patient=P-4").patients == ("P-4",)
    assert describe_interaction("GET", "/fhir/Patient", "_id=P-5").patients == ("P-5",)


@pytest.mark.parametrize(
    ("path", "audited"),
    [
        ("/fhir", True),
        ("/fhir/Task", True),
        ("/fhir/ImagingStudy/1.2/$analyze", True),
        ("/fhir/$sync-status", True),
        ("/dicom-web/studies", True),
        ("/dicom-web", True),
        ("/fhir/metadata", False),
        ("/fhir/.well-known/smart-configuration", False),
        ("/.well-known/smart-configuration", False),
        ("/docs", False),
        ("/openapi.json", False),
        ("/metrics", False),
        ("/auth/jwks", False),
        ("/fhirx", False),
    ],
)
def test_which_paths_are_audited(path: str, audited: bool) -> None:
    assert is_audited(path) is audited


def test_the_site_is_required() -> None:
    with pytest.raises(ValueError, match="site"):
        audit_event(
            describe_interaction("GET", "/fhir/Task"),
            status=200,
            access=None,
            client_address=None,
            correlation_id=None,
            site="",
            started=STARTED,
            ended=STARTED,
        )


def test_the_narrative_says_action_outcome_who_what_when() -> None:
    event = event_for("GET", "/fhir/Task/t-1", access=clinician())
    narrative_text(
        event,
        "Read/View/Print: GET /fhir/Task/t-1: 200 OK",
        "Outcome Success",
        f"When {event['recorded']}",
        "viewer-app (Source Role ID) from 10.1.2.3",
        "Practitioner/p-7 (human user)",
        "Task/t-1 (Domain Resource)",
        "Patient/P-1001 (Patient)",
        "X-Request-Id corr-1",
    )
    refused = event_for("DELETE", "/fhir/Task/t-1", status=403)
    narrative_text(refused, "Delete:", "Minor failure", "403 Forbidden")


def test_hostile_values_in_the_narrative_are_escaped() -> None:
    hostile = "<script>alert(1)</script>&x"
    event = event_for("GET", f"/fhir/{hostile}", status=404)
    assert "<script" not in event["text"]["div"] and "&amp;x" in event["text"]["div"]
    narrative_text(event, hostile)
    token = authentication_event(
        "token",
        description=f"client {hostile!r} failed",
        username=None,
        client_id=hostile,
        client_address="10.1.2.3",
        correlation_id="corr-3",
        site="https://facade.example",
        issuer=ISSUER,
        moment=STARTED,
    )
    validate(token)
    assert "<script" not in token["text"]["div"]
    narrative_text(token, "Execute:", hostile, "authorization server", "Minor failure")


def test_the_authorization_server_agent_type_is_in_the_r4_value_set() -> None:
    """AuditEvent.agent.type is bound (extensible) to participation-role-type, which has
    extra-security-role-type#authserver: BALP's UserAgentTypes#AuthzOauthService is not needed."""
    event = authentication_event(
        "token",
        description="bad assertion",
        username=None,
        client_id="svc",
        client_address=None,
        correlation_id=None,
        site="https://facade.example",
        issuer=ISSUER,
        moment=STARTED,
    )
    server = next(a for a in event["agent"] if not a["requestor"])
    assert server["type"]["coding"] == [
        {
            "system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
            "code": "authserver",
            "display": "authorization server",
        }
    ]
