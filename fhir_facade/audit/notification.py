"""The AuditEvent of one subscription notification the server sent (or tried to send) to a
rest-hook endpoint (docs/adr/0026-subscriptions-design.md, "Durable delivery"). Pure, like
`event.audit_event`; the delivery worker reports each attempt and the runtime hands the result to
the one `AuditRecorder`.

Codes:
- type DCM 110106 "Export" (DICOM PS3.16 CID 400; PS3.15 A.5.3.6: data leaves the system for a
  destination outside it), action R, as DICOM's Export record has it: a notification is the server
  sending data (an id, or the whole resource) to a receiver it does not control, on nobody's
  request in the moment, which is what Export records. `rest` (audit-event-type) would say a client
  made a RESTful request of this server, which no client did.
- subtype: the notification's type from R4B's `subscription-notification-type` (handshake,
  event-notification), so handshakes and events can be told apart in a search.
- outcome 0 (a 2xx), 4 (the receiver answered, but not 2xx: refused, retried later),
  8 (no answer: connection refused or timed out).
- agents: the server (DCM 110150 "Application", requestor) and the destination (DCM 110152
  "Destination Role ID", the endpoint without its query, its host as network address). Headers
  (they may carry the receiver's credentials) are never recorded.
- entities: the Subscription (object role 23 "Routing Criteria": it decides where data goes), with
  the event number in `detail`; the focus (versioned reference, role 4), recorded for every payload
  content, `empty` too: the audit is internal, readable only by who may read AuditEvents, and "what
  change was announced to whom" is what it must answer; `description` says what was sent of it;
  the Patients the focus refers to when it was read (`full-resource`), role 1.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlsplit

from fhir_facade.audit.event import _SOURCE_TYPE, SERVER_AGENT, audit_event_narrative
from fhir_facade.audit.interaction import DCM
from fhir_facade.fhir.narrative import with_narrative

__all__ = ["EXPORT", "notification_audit_event"]

EXPORT: Final = {"system": DCM, "code": "110106", "display": "Export"}
_NOTIFICATION_TYPE: Final = "http://hl7.org/fhir/subscription-notification-type"
_APPLICATION: Final = {"system": DCM, "code": "110150", "display": "Application"}
_DESTINATION: Final = {"system": DCM, "code": "110152", "display": "Destination Role ID"}
_ENTITY_TYPE: Final = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_OBJECT_ROLE: Final = "http://terminology.hl7.org/CodeSystem/object-role"
_SYSTEM_OBJECT: Final = {"system": _ENTITY_TYPE, "code": "2", "display": "System Object"}
_PERSON: Final = {"system": _ENTITY_TYPE, "code": "1", "display": "Person"}
_ROUTING: Final = {"system": _OBJECT_ROLE, "code": "23", "display": "Routing Criteria"}
_RESOURCE_ROLE: Final = {"system": _OBJECT_ROLE, "code": "4", "display": "Domain Resource"}
_PATIENT_ROLE: Final = {"system": _OBJECT_ROLE, "code": "1", "display": "Patient"}
_SENT: Final = {
    "empty": "announced (empty content: not sent)",
    "id-only": "sent as its id (id-only content)",
    "full-resource": "sent in full (full-resource content)",
}


def _instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


def _outcome(status: int | None) -> str:
    if status is None:
        return "8"
    return "0" if 200 <= status < 300 else "4"


def _destination(endpoint: str) -> dict[str, Any]:
    parts = urlsplit(endpoint)
    shown = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
    agent: dict[str, Any] = {
        "type": {"coding": [dict(_DESTINATION)]},
        "who": {"display": shown},
        "requestor": False,
    }
    host = parts.hostname
    if host:
        try:
            ipaddress.ip_address(host)
            kind = "2"  # IP address
        except ValueError:
            kind = "1"  # machine name
        agent["network"] = {"address": host, "type": kind}
    return agent


def notification_audit_event(
    *,
    site: str,
    subscription_id: str,
    endpoint: str,
    kind: str,
    content: str,
    event_number: int | None,
    focus: str | None,
    patients: Iterable[str] = (),
    status: int | None,
    error: str | None,
    started: datetime,
    ended: datetime,
) -> dict[str, Any]:
    """The AuditEvent of one notification attempt. `focus`: the reference the event is about
    (`Type/id/_history/n`, or `Type/id` for a live resource); `patients`: Patient ids it refers to;
    `status`: the receiver's HTTP status, None when none came; `error`: what failed."""
    if not site:
        raise ValueError("site must name this server (e.g. its public root URL)")
    number = f" {event_number}" if event_number is not None else ""
    answer = f"HTTP {status}" if status is not None and error is None else (error or "no answer")
    entity: list[dict[str, Any]] = [
        {
            "what": {"reference": f"Subscription/{subscription_id}"},
            "type": dict(_SYSTEM_OBJECT),
            "role": dict(_ROUTING),
            **({"detail": [{"type": "event-number", "valueString": str(event_number)}]} if number else {}),
        }
    ]
    if focus:
        entity.append(
            {
                "what": {"reference": focus},
                "type": dict(_SYSTEM_OBJECT),
                "role": dict(_RESOURCE_ROLE),
                "description": _SENT.get(content, content),
            }
        )
    for patient in sorted(set(patients)):
        entity.append(
            {"what": {"reference": f"Patient/{patient}"}, "type": dict(_PERSON), "role": dict(_PATIENT_ROLE)}
        )
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": dict(EXPORT),
        "subtype": [{"system": _NOTIFICATION_TYPE, "code": kind}],
        "action": "R",
        "period": {"start": _instant(started), "end": _instant(ended)},
        "recorded": _instant(ended),
        "outcome": _outcome(status),
        "outcomeDesc": f"rest-hook {kind}{number} of Subscription/{subscription_id}: {answer}"[:1000],
        "agent": [
            {"type": {"coding": [dict(_APPLICATION)]}, "who": {"display": SERVER_AGENT}, "requestor": True},
            _destination(endpoint),
        ],
        "source": {"site": site, "observer": {"display": f"fhir-facade {site}"}, "type": [_SOURCE_TYPE]},
        "entity": entity,
    }
    return with_narrative(event, audit_event_narrative(event))
