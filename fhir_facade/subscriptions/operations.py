"""`Subscription/{id}/$status` and `$events` (Subscriptions R5 Backport IG 1.1.0,
OperationDefinition-backport-subscription-status and -events).

Both read the Subscription through the interaction pipeline with the caller's token first, so
only a caller who may read the subscription learns anything of it. `$events` rebuilds the
notifications of the kept event rows (`eventsSinceNumber`, `eventsUntilNumber`, both inclusive;
`content` defaults to the subscription's), reading focus resources with the caller's rights.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from fhir_facade.fhir.errors import bad_request
from fhir_facade.fhir.negotiation import negotiate_response_format
from fhir_facade.fhir.openapi import error_responses
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.responses import fhir_response
from fhir_facade.subscriptions.backport import PAYLOAD_CONTENTS, parse_subscription
from fhir_facade.subscriptions.delivery import read_focus
from fhir_facade.subscriptions.notification import NotificationEvent, notification_bundle, status_parameters
from fhir_facade.subscriptions.queue import SubscriptionQueue
from fhir_facade.subscriptions.topics import Topic

__all__ = ["OPERATIONS", "build_operations_router"]

_IG_OPS = "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition"
#: CapabilityStatement.rest.resource.operation entries for Subscription.
OPERATIONS = (
    {"name": "status", "definition": f"{_IG_OPS}/backport-subscription-status"},
    {"name": "events", "definition": f"{_IG_OPS}/backport-subscription-events"},
)
_MAX_EVENTS = 1000


async def _parameters(request: Request) -> dict[str, str]:
    """The operation's parameters: the query string, and for POST a Parameters body."""
    found = dict(request.query_params)
    if request.method == "POST" and (await request.body()):
        body = await request.json()
        for parameter in body.get("parameter", []) if isinstance(body, dict) else []:
            for key, value in parameter.items():
                if key.startswith("value"):
                    found[str(parameter.get("name"))] = str(value)
    return found


def _number(parameters: Mapping[str, str], name: str) -> int | None:
    text = parameters.get(name)
    if text is None:
        return None
    if not text.isdigit():
        raise bad_request(f"{name} must be a non-negative event number, not {text!r}", expression=name)
    return int(text)


def build_operations_router(
    readers: Mapping[str, ResourceProvider], queue: SubscriptionQueue, topics: dict[str, Topic], base_url: str
) -> APIRouter:
    router = APIRouter(prefix="/fhir")
    subscriptions = readers["Subscription"]

    async def status(subscription_id: str, request: Request) -> Response:
        negotiate_response_format(request)
        subscription = await subscriptions.read(subscription_id)
        counters = await run_in_threadpool(queue.counters, subscription_id)
        content = parse_subscription(subscription, topics).content
        parameters = status_parameters(
            base_url, subscription, "query-status", (counters or (0, 0))[0], [], content
        )
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": "searchset",
            "total": 1,
            "entry": [
                {
                    "fullUrl": f"urn:uuid:{parameters['id']}",
                    "resource": parameters,
                    "search": {"mode": "match"},
                }
            ],
        }
        return fhir_response(bundle, request)

    async def events(subscription_id: str, request: Request) -> Response:
        negotiate_response_format(request)
        parameters = await _parameters(request)
        since = _number(parameters, "eventsSinceNumber")
        until = _number(parameters, "eventsUntilNumber")
        subscription = await subscriptions.read(subscription_id)
        content = parameters.get("content") or parse_subscription(subscription, topics).content
        if content not in PAYLOAD_CONTENTS:
            raise bad_request(
                f"content must be one of {', '.join(sorted(PAYLOAD_CONTENTS))}", expression="content"
            )
        counters = await run_in_threadpool(queue.counters, subscription_id)
        rows = await run_in_threadpool(
            queue.events, subscription_id, max((since or 1) - 1, 0), until, _MAX_EVENTS
        )
        replayed = []
        for row in rows:
            focus = await read_focus(readers, row) if content == "full-resource" else None
            replayed.append(
                NotificationEvent(
                    row.event_number,
                    row.occurred_at,
                    row.resource_type,
                    row.resource_id,
                    row.version_id,
                    focus,
                    row.event_code,
                )
            )
        bundle = notification_bundle(
            base_url, subscription, "query-event", (counters or (0, 0))[0], replayed, content
        )
        return fhir_response(bundle, request)

    summaries = {
        "status": (status, "Subscription status (Backport IG $status)"),
        "events": (events, "Replay of a subscription's events by number (Backport IG $events)"),
    }
    for name, (endpoint, summary) in summaries.items():
        for method in ("GET", "POST"):
            router.add_api_route(
                f"/Subscription/{{subscription_id}}/${name}",
                endpoint,
                methods=[method],
                summary=summary,
                operation_id=f"subscription_{name}_{method.lower()}",
                responses=error_responses(400, 404, 410),
            )
    return router
