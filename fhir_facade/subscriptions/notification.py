"""Notification Bundles as the Subscriptions R5 Backport IG 1.1.0 defines them for R4
(StructureDefinition-backport-subscription-notification-r4): a `history` Bundle whose first entry
is the `backport-subscription-status-r4` Parameters (subscription, topic, status, type,
events-since-subscription-start, and one notification-event per event: event-number, timestamp,
focus), followed by the focus resources for `id-only` (fullUrl and request only) and
`full-resource` (the resource too). `empty` carries neither the focus nor the entries.
Pure functions: the worker reads the resources and hands them in."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "EVENT_SYSTEM",
    "EVENT_TRIGGER_EXTENSION",
    "STATUS_PROFILE",
    "NotificationEvent",
    "notification_bundle",
    "status_parameters",
]

_IG = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
STATUS_PROFILE = f"{_IG}/backport-subscription-status-r4"
NOTIFICATION_PROFILE = f"{_IG}/backport-subscription-notification-r4"
#: On a notification-event: the code of the eventTrigger that fired (docs/adr/0026, addendum).
EVENT_TRIGGER_EXTENSION = "http://fhir-facade.org/fhir/StructureDefinition/subscription-event-trigger"
#: The facade's event codes (capability/CodeSystem-subscription-event.json).
EVENT_SYSTEM = "http://fhir-facade.org/fhir/CodeSystem/subscription-event"


@dataclass(frozen=True)
class NotificationEvent:
    number: int
    occurred_at: datetime
    resource_type: str
    resource_id: str
    version_id: int
    #: The focus resource for full-resource content (None: not read, or refused).
    resource: dict[str, Any] | None = None
    #: Which event trigger of the topic it is (`study-available`, `study-changed`); None for a
    #: resource trigger.
    trigger: str | None = None


def _instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def status_parameters(
    base_url: str,
    subscription: dict[str, Any],
    kind: str,
    events_since_start: int,
    events: list[NotificationEvent],
    content: str,
) -> dict[str, Any]:
    """The SubscriptionStatus (R4: Parameters) of one notification or status query.
    `kind`: handshake, heartbeat, event-notification, query-status, query-event."""
    parameters: list[dict[str, Any]] = [
        {
            "name": "subscription",
            "valueReference": {"reference": f"{base_url}/Subscription/{subscription['id']}"},
        },
        {"name": "topic", "valueCanonical": subscription["criteria"]},
        {"name": "status", "valueCode": subscription.get("status", "active")},
        {"name": "type", "valueCode": kind},
        # R4 has no integer64: the IG carries the count and the numbers as strings.
        {"name": "events-since-subscription-start", "valueString": str(events_since_start)},
    ]
    for event in events:
        parts: list[dict[str, Any]] = [
            {"name": "event-number", "valueString": str(event.number)},
            {"name": "timestamp", "valueInstant": _instant(event.occurred_at)},
        ]
        if content != "empty":
            reference = f"{base_url}/{event.resource_type}/{event.resource_id}"
            if event.version_id:  # 0: a live resource of the PACS, which has no versions
                reference += f"/_history/{event.version_id}"
            parts.append({"name": "focus", "valueReference": {"reference": reference}})
        parameter: dict[str, Any] = {"name": "notification-event", "part": parts}
        if event.trigger is not None:
            # The IG's notification-event has no part naming the trigger (R5 SubscriptionStatus has
            # none either); an extension says which of the topic's eventTriggers fired.
            parameter["extension"] = [
                {
                    "url": EVENT_TRIGGER_EXTENSION,
                    "valueCoding": {"system": EVENT_SYSTEM, "code": event.trigger},
                }
            ]
        parameters.append(parameter)
    return {
        "resourceType": "Parameters",
        "id": str(uuid.uuid4()),
        "meta": {"profile": [STATUS_PROFILE]},
        "parameter": parameters,
    }


def notification_bundle(
    base_url: str,
    subscription: dict[str, Any],
    kind: str,
    events_since_start: int,
    events: list[NotificationEvent],
    content: str,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The Bundle POSTed to a rest-hook endpoint (or returned by $events / $status)."""
    status = status_parameters(base_url, subscription, kind, events_since_start, events, content)
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"urn:uuid:{status['id']}",
            "resource": status,
            "request": {"method": "GET", "url": f"Subscription/{subscription['id']}/$status"},
            "response": {"status": "200"},
        }
    ]
    if content != "empty":
        for event in events:
            entry: dict[str, Any] = {
                "fullUrl": f"{base_url}/{event.resource_type}/{event.resource_id}",
                "request": {
                    "method": "POST" if event.version_id <= 1 else "PUT",
                    "url": event.resource_type
                    if event.version_id <= 1
                    else f"{event.resource_type}/{event.resource_id}",
                },
                "response": {"status": "201" if event.version_id <= 1 else "200"},
            }
            if content == "full-resource" and event.resource is not None:
                entry["resource"] = event.resource
            entries.append(entry)
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"profile": [NOTIFICATION_PROFILE]},
        "type": "history",
        "timestamp": _instant(now or datetime.now(UTC)),
        "entry": entries,
    }
