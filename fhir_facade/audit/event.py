"""The AuditEvent of one request (FHIR R4 auditevent.html), as plain JSON. Pure: the middleware
gathers the facts, this module only arranges them, so it is tested without a server.

Layout, following IHE Basic Audit Log Patterns (BALP) where R4 leaves a choice:

- type: `audit-event-type#rest` with a `restful-interaction` subtype for FHIR; DICOM 110112
  Query / 110106 Export / 110107 Import for DICOMweb QIDO / WADO / STOW. action C/R/U/D/E.
- outcome from the HTTP status: 0 (success, < 400), 4 (4xx: the request was refused),
  8 (5xx: the server failed), 12 (no answer was sent at all). outcomeDesc: method, path, status.
- agent: the client (requestor: the OAuth client_id as `who.identifier`, the source IP as
  `network.address`, type "2"); the user, when the token names one (`who.reference` = fhirUser,
  else `who.identifier` = sub at the token issuer; the token's jti in `policy`, as BALP does).
  R4 allows one requestor, the client. Without a token (FACADE_AUTH=none, or refused before
  authentication) one agent records the address and says the request was unauthenticated.
- source: `site` = the public root, `observer.display` = "fhir-facade <site>".
- entity: the resource acted on (`what.reference`), the query (`query` = base64 of the request
  relative to the service base, e.g. `Observation?patient=1`), the operation (`name` "$analyze"),
  DICOM studies (`what.identifier` urn:oid), each Patient in context (role 1 Patient), and the
  correlation id (BALP's transaction entity), in `what.identifier.value` with identifier type text
  "X-Request-Id" (the id the facade echoes and sends on). Its entity.type is R4's audit-entity-type
  "2" System Object, not BALP's `BasicAuditEntityType#XrequestId`: R4 binds entity.type
  (extensible) to audit-entity-type, whose codes (1-4 and the resource types) have one that fits.
"""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Final

from fhir_facade.audit.interaction import DCM, Interaction
from fhir_facade.auth.access import Access
from fhir_facade.dicom_to_fhir.uids import uid_identifier
from fhir_facade.fhir.narrative import (
    Facts,
    Items,
    Paragraph,
    joined,
    narrative,
    reference_text,
    with_narrative,
)
from fhir_facade.fhir.references import parse_reference

__all__ = [
    "CLIENT_ID_SYSTEM",
    "CORRELATION_ENTITY_TYPE",
    "CORRELATION_IDENTIFIER_TYPE",
    "audit_event",
    "audit_event_narrative",
    "audit_outcome",
    "correlation_entity",
]

#: Identifier.system of OAuth 2.0 client ids (who.identifier of the client agent).
CLIENT_ID_SYSTEM: Final = "urn:ietf:params:oauth:client-id"
_ENTITY_TYPE: Final = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
#: AuditEvent.entity.type of the correlation id entity (IHE BALP's "transaction" entity): the
#: request is a system object, and audit-entity-type#2 is inside the R4 value set
#: (valueset-audit-entity-type.html), where BALP's BasicAuditEntityType#XrequestId is not.
CORRELATION_ENTITY_TYPE: Final = {"system": _ENTITY_TYPE, "code": "2", "display": "System Object"}
_SYSTEM_OBJECT: Final = CORRELATION_ENTITY_TYPE
#: what.identifier.type of the correlation id entity: says which of the System Objects it is.
CORRELATION_IDENTIFIER_TYPE: Final = {"text": "X-Request-Id"}
_OBJECT_ROLE: Final = "http://terminology.hl7.org/CodeSystem/object-role"
_PERSON: Final = {"system": _ENTITY_TYPE, "code": "1", "display": "Person"}
_PATIENT_ROLE: Final = {"system": _OBJECT_ROLE, "code": "1", "display": "Patient"}
_RESOURCE_ROLE: Final = {"system": _OBJECT_ROLE, "code": "4", "display": "Domain Resource"}
_JOB_ROLE: Final = {"system": _OBJECT_ROLE, "code": "20", "display": "Job"}
_QUERY_ROLE: Final = {"system": _OBJECT_ROLE, "code": "24", "display": "Query"}
_OPERATION_TYPE: Final = {"system": "http://hl7.org/fhir/resource-types", "code": "OperationDefinition"}
_STUDY_UID_TYPE: Final = {"system": DCM, "code": "110180", "display": "Study Instance UID"}
_CLIENT_TYPE: Final = {"system": DCM, "code": "110153", "display": "Source Role ID"}
#: The server acting on its own (an arrival Task, a scheduling Task): DICOM "Application" (PS3.16 CID 402).
_SERVER_TYPE: Final = {"system": DCM, "code": "110150", "display": "Application"}
SERVER_AGENT: Final = "fhir-facade (the server itself)"
_USER_TYPE: Final = {
    "system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
    "code": "humanuser",
    "display": "human user",
}
_SUBTYPE_SYSTEM: Final = "http://hl7.org/fhir/restful-interaction"
_SOURCE_TYPE: Final = {
    "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
    "code": "4",
    "display": "Application Server",
}
#: AuditEvent.agent.network.type "2": IP address.
_IP_ADDRESS: Final = "2"
_NO_WHITESPACE = re.compile(r"^\S+$")


def audit_outcome(status: int | None) -> str:
    """AuditEvent.outcome (R4 audit-event-outcome) of an HTTP status; None = nothing answered."""
    if status is None:
        return "12"
    if status >= 500:
        return "8"
    if status >= 400:
        return "4"
    return "0"


def _instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


def _coding(value: dict[str, str]) -> dict[str, Any]:
    return {"coding": [dict(value)]}


def _network(address: str | None) -> dict[str, Any]:
    return {"network": {"address": address, "type": _IP_ADDRESS}} if address else {}


def _agents(
    access: Access | None,
    status: int | None,
    address: str | None,
    subject_system: str | None,
    base_url: str,
    by_server: bool = False,
) -> list[dict[str, Any]]:
    if access is None and by_server:
        return [{"type": _coding(_SERVER_TYPE), "who": {"display": SERVER_AGENT}, "requestor": True}]
    if access is None or not access.enforced:
        why = (
            "FACADE_AUTH=none"
            if access is not None
            else "no valid access token"
            if status in (401, 403)
            else "no access token was checked"
        )
        return [
            {
                "type": _coding(_CLIENT_TYPE),
                "who": {"display": "unauthenticated client"},
                "name": f"unauthenticated ({why})",
                "requestor": True,
                **_network(address),
            }
        ]
    client: dict[str, Any] = {"type": _coding(_CLIENT_TYPE), "requestor": True, **_network(address)}
    if access.client_id:
        client["who"] = {
            "identifier": {"system": CLIENT_ID_SYSTEM, "value": access.client_id},
            "display": access.client_id,
        }
    else:
        client["who"] = {"display": "client without client_id"}
    agents = [client]
    user = _user(access, subject_system, base_url)
    if user is not None:
        agents.append(user)
    return agents


def _user(access: Access, subject_system: str | None, base_url: str) -> dict[str, Any] | None:
    """The user agent: fhirUser as a reference (relative when it is on this server), else the
    token's sub; none when the token names no one but the client (backend services)."""
    who: dict[str, Any]
    user_reference = parse_reference(access.fhir_user, base_url) if access.fhir_user else None
    if user_reference is not None and user_reference.relative and user_reference.version is None:
        # Relative when it is on this server, as written when it is on another.
        who = {"reference": user_reference.relative if user_reference.is_local else user_reference.raw}
    elif access.subject and access.subject != access.client_id:
        identifier = {"value": access.subject}
        if subject_system:
            identifier = {"system": subject_system, **identifier}
        who = {"identifier": identifier}
    elif access.fhir_user:
        who = {"display": access.fhir_user.removeprefix(base_url.rstrip("/") + "/")}
    else:
        return None
    agent: dict[str, Any] = {"type": _coding(_USER_TYPE), "who": who, "requestor": False}
    if access.subject:
        agent["altId"] = access.subject
    if access.token_id and _NO_WHITESPACE.match(access.token_id):
        agent["policy"] = [access.token_id]
    return agent


def _entities(
    interaction: Interaction, access: Access | None, created: str | None, correlation_id: str | None
) -> list[dict[str, Any]]:
    entities: list[dict[str, Any]] = []
    named: set[str] = set()
    for reference in (*interaction.targets, *((created,) if created else ())):
        plain = parse_reference(reference).relative or reference
        if plain in named:
            continue
        named.add(plain)
        patient = plain.startswith("Patient/")
        role = _JOB_ROLE if interaction.operation and plain.startswith("Task/") else _RESOURCE_ROLE
        entities.append(
            {
                "what": {"reference": reference},
                "type": _PERSON if patient else _SYSTEM_OBJECT,
                "role": _PATIENT_ROLE if patient else role,
            }
        )
    if interaction.operation:
        entities.append(
            {
                "type": _OPERATION_TYPE,
                "name": f"${interaction.operation}",
                "description": f"{interaction.method} {interaction.path}",
            }
        )
    if interaction.query is not None:
        entities.append(
            {
                "type": _SYSTEM_OBJECT,
                "role": _QUERY_ROLE,
                "query": base64.b64encode(interaction.query.encode("utf-8")).decode("ascii"),
            }
        )
    for uid in interaction.studies:
        entities.append(
            {
                "what": {
                    "identifier": {
                        "type": _coding(_STUDY_UID_TYPE),
                        **uid_identifier(uid),
                    }
                },
                "type": _SYSTEM_OBJECT,
                "role": _RESOURCE_ROLE,
            }
        )
    context = (access.patient,) if access is not None and access.patient else ()
    for patient_id in (*context, *interaction.patients):
        reference = f"Patient/{patient_id}"
        if reference not in named:
            named.add(reference)
            entities.append({"what": {"reference": reference}, "type": _PERSON, "role": _PATIENT_ROLE})
    if correlation_id:
        entities.append(correlation_entity(correlation_id))
    return entities


def correlation_entity(correlation_id: str) -> dict[str, Any]:
    """The AuditEvent.entity that carries a request's correlation id (X-Request-Id)."""
    return {
        "type": dict(CORRELATION_ENTITY_TYPE),
        "what": {"identifier": {"type": dict(CORRELATION_IDENTIFIER_TYPE), "value": correlation_id}},
    }


def audit_event(
    interaction: Interaction,
    *,
    status: int | None,
    access: Access | None,
    client_address: str | None,
    correlation_id: str | None,
    site: str,
    started: datetime,
    ended: datetime,
    created: str | None = None,
    subject_system: str | None = None,
    base_url: str = "",
    origin: str | None = None,
) -> dict[str, Any]:
    """The AuditEvent of one request (see the module docstring for where each fact goes).

    `status` is the HTTP status answered (None: none was); `access` the caller as the
    authenticating dependency recorded it (None: it did not run or refused the token);
    `created` the `Type/id` a create answered with (its Location); `subject_system` the
    Identifier.system of token subjects (the issuer); `base_url` our FHIR base, stripped from a
    fhirUser on this server so it becomes a relative, searchable reference. `origin`: the pipeline
    origin of an interaction recorded by the audit stage (bundle-entry, operation, internal), said in
    outcomeDesc; for `internal` without `access` the requestor is the server itself."""
    if not site:
        raise ValueError("site must name this server (e.g. its public root URL)")
    phrase = _phrase(status)
    event: dict[str, Any] = {"resourceType": "AuditEvent", "type": dict(interaction.event_type)}
    if interaction.subtype:
        event["subtype"] = [{"system": _SUBTYPE_SYSTEM, "code": interaction.subtype}]
    event |= {
        "action": interaction.action,
        "period": {"start": _instant(started), "end": _instant(ended)},
        "recorded": _instant(ended),
        "outcome": audit_outcome(status),
        "outcomeDesc": f"{interaction.method} {interaction.path}{f' ({origin})' if origin else ''}: {phrase}",
        "agent": _agents(
            access, status, client_address, subject_system, base_url, by_server=origin == "internal"
        ),
        "source": {"site": site, "observer": {"display": f"fhir-facade {site}"}, "type": [_SOURCE_TYPE]},
    }
    entities = _entities(interaction, access, created, correlation_id)
    if entities:
        event["entity"] = entities
    return with_narrative(event, audit_event_narrative(event))


def _phrase(status: int | None) -> str:
    if status is None:
        return "no response"
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


#: R4 audit-event-action and audit-event-outcome displays (valueset-audit-event-action.html,
#: valueset-audit-event-outcome.html), for the narrative.
_ACTIONS: Final = {"C": "Create", "R": "Read/View/Print", "U": "Update", "D": "Delete", "E": "Execute"}
_OUTCOMES: Final = {
    "0": "Success",
    "4": "Minor failure (the request was refused)",
    "8": "Serious failure (the server failed)",
    "12": "Major failure (no answer was sent)",
}


def _who(agent: dict[str, Any]) -> str:
    who = reference_text(agent.get("who")) or agent.get("name") or "unknown"
    role = joined(c.get("display") or c.get("code") for c in agent.get("type", {}).get("coding", []))
    address = agent.get("network", {}).get("address")
    return f"{who}" + (f" ({role})" if role else "") + (f" from {address}" if address else "")


def _what(entity: dict[str, Any]) -> str:
    what = reference_text(entity.get("what"))
    role = entity.get("role", {}).get("display")
    if what is None and entity.get("name"):
        what = f"operation {entity['name']}"
    if what is None and "query" in entity:
        what = "the search query"
    kind = entity.get("what", {}).get("identifier", {}).get("type", {})
    label = kind.get("text") or joined(c.get("display") for c in kind.get("coding", []))
    return (f"{label} " if label else "") + f"{what or 'unnamed'}" + (f" ({role})" if role else "")


def audit_event_narrative(event: dict[str, Any]) -> dict[str, str]:
    """An AuditEvent's narrative: action, outcome, who, what, when (R4 narrative.html), from the
    event's own elements, so request and authentication events share it."""
    kind = joined(
        c.get("display") or c.get("code") for c in (event.get("type", {}), *event.get("subtype", []))
    )
    action = _ACTIONS.get(str(event.get("action")), event.get("action"))
    outcome = _OUTCOMES.get(str(event.get("outcome")), event.get("outcome"))
    return narrative(
        Paragraph(f"{event.get('outcomeDesc') or kind}", label=f"{action}:"),
        Facts(
            [
                ("Event", kind),
                ("Action", action),
                ("Outcome", outcome),
                ("When", event.get("recorded")),
                ("Recorded by", event.get("source", {}).get("observer", {}).get("display")),
            ]
        ),
        Paragraph("Who", strong=True),
        Items([_who(agent) for agent in event.get("agent", [])]),
        Paragraph("What", strong=True) if event.get("entity") else None,
        Items([_what(entity) for entity in event.get("entity", [])]),
    )
