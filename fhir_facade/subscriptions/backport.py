"""A Subscription as the Subscriptions R5 Backport IG 1.1.0 shapes it for R4, read and checked.

R4 Subscription (subscription.html) carries the R5 topic-based model like this (IG,
StructureDefinition-backport-subscription): `criteria` is the topic's canonical URL, each filter a
`backport-filter-criteria` extension on `_criteria` (`Type?param=value`), `channel.type` the
channel (`rest-hook` or `websocket`), `channel.payload` the MIME type with the
`backport-payload-content` extension on `_payload` (`empty`, `id-only`, `full-resource`),
`channel.header` extra HTTP headers (rest-hook), and the `backport-heartbeat-period` extension on
`channel` the seconds after which a heartbeat notification is sent when nothing else was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from fhir_facade.fhir.errors import FhirError, error
from fhir_facade.subscriptions.topics import Filter, Topic

__all__ = [
    "CHANNELS",
    "FILTER_CRITERIA",
    "HEARTBEAT_PERIOD",
    "PAYLOAD_CONTENT",
    "PAYLOAD_CONTENTS",
    "SUBSCRIPTION_PROFILE",
    "SubscriptionSpec",
    "endpoint_allowed",
    "parse_subscription",
]

_IG = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
SUBSCRIPTION_PROFILE = f"{_IG}/backport-subscription"
FILTER_CRITERIA = f"{_IG}/backport-filter-criteria"
PAYLOAD_CONTENT = f"{_IG}/backport-payload-content"
PAYLOAD_CONTENTS = frozenset({"empty", "id-only", "full-resource"})
HEARTBEAT_PERIOD = f"{_IG}/backport-heartbeat-period"
#: The channel types this server delivers by (websocket: docs/adr/0028-websocket-channel.md).
CHANNELS = ("rest-hook", "websocket")
_FHIR_JSON = frozenset({"application/fhir+json", "application/json"})


@dataclass(frozen=True)
class SubscriptionSpec:
    """What delivery needs of one Subscription version."""

    id: str
    status: str
    topic: Topic
    filters: tuple[Filter, ...]
    channel: str
    endpoint: str
    content: str
    headers: tuple[tuple[str, str], ...]
    #: Seconds without a notification after which a heartbeat is sent (None: no heartbeats).
    heartbeat_period: int | None = None


def _invalid(message: str, expression: str) -> FhirError:
    return error(422, "invalid", message, detail_code="subscription_invalid", expression=(expression,))


def _extensions(element: Any, url: str) -> list[dict[str, Any]]:
    if not isinstance(element, dict):
        return []
    return [e for e in element.get("extension", []) if isinstance(e, dict) and e.get("url") == url]


def _filters(resource: dict[str, Any], topic: Topic) -> tuple[Filter, ...]:
    found: list[Filter] = []
    for extension in _extensions(resource.get("_criteria"), FILTER_CRITERIA):
        text = extension.get("valueString")
        kind, mark, query = str(text or "").partition("?")
        if not mark or kind != topic.resource_type or not query:
            raise _invalid(
                f"A filterCriteria must read '{topic.resource_type}?parameter=value', not {text!r}",
                "Subscription.criteria.extension",
            )
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name not in topic.filter_parameters:
                allowed = ", ".join(sorted(topic.filter_parameters))
                raise _invalid(
                    f"The topic {topic.url} cannot filter by {name!r} (it can by: {allowed})",
                    "Subscription.criteria.extension",
                )
            if not value:
                raise _invalid(f"The filter {name!r} has no value", "Subscription.criteria.extension")
            found.append(Filter(name, value))
    return tuple(found)


def _headers(values: Any) -> tuple[tuple[str, str], ...]:
    found: list[tuple[str, str]] = []
    for value in values or []:
        name, colon, text = str(value).partition(":")
        if not colon or not name.strip() or any(c in value for c in "\r\n"):
            raise _invalid(
                f"A channel.header must read 'Name: value', not {value!r}", "Subscription.channel.header"
            )
        found.append((name.strip(), text.strip()))
    return tuple(found)


def parse_subscription(resource: dict[str, Any], topics: dict[str, Topic]) -> SubscriptionSpec:
    """The Subscription's topic, filters, channel and payload; a 422 OperationOutcome
    (`subscription_invalid`) naming the element when the server cannot serve it."""
    criteria = resource.get("criteria")
    topic = topics.get(str(criteria))
    if topic is None:
        served = ", ".join(sorted(topics))
        raise _invalid(
            f"Subscription.criteria must be the canonical URL of a topic this server serves ({served})",
            "Subscription.criteria",
        )
    channel = resource.get("channel") if isinstance(resource.get("channel"), dict) else {}
    assert isinstance(channel, dict)
    kind = channel.get("type")
    if kind not in CHANNELS:
        raise _invalid(
            f"channel.type {kind!r} is not supported; this server delivers by {' or '.join(CHANNELS)}",
            "Subscription.channel.type",
        )
    endpoint = channel.get("endpoint")
    if kind == "websocket":
        endpoint = ""  # the client connects to the server (IG "websocket"); an endpoint is not used
    elif not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
        raise _invalid(
            "A rest-hook channel needs an http(s) channel.endpoint", "Subscription.channel.endpoint"
        )
    payload = channel.get("payload")
    contents = [e.get("valueCode") for e in _extensions(channel.get("_payload"), PAYLOAD_CONTENT)]
    if payload is None:
        content = contents[0] if contents else "empty"
    elif payload not in _FHIR_JSON:
        raise _invalid(
            f"channel.payload {payload!r}: only application/fhir+json", "Subscription.channel.payload"
        )
    else:
        content = contents[0] if contents else "id-only"
    if content not in PAYLOAD_CONTENTS or len(contents) > 1:
        raise _invalid(
            f"The payload content must be one of {', '.join(sorted(PAYLOAD_CONTENTS))}",
            "Subscription.channel.payload.extension",
        )
    return SubscriptionSpec(
        id=str(resource.get("id", "")),
        status=str(resource.get("status", "")),
        topic=topic,
        filters=_filters(resource, topic),
        channel=str(kind),
        endpoint=str(endpoint),
        content=content,
        headers=_headers(channel.get("header")),
        heartbeat_period=_heartbeat_period(channel),
    )


def _heartbeat_period(channel: dict[str, Any]) -> int | None:
    """The `backport-heartbeat-period` extension on `channel` (IG: unsignedInt, seconds); a positive
    integer, at most one."""
    found = _extensions(channel, HEARTBEAT_PERIOD)
    if not found:
        return None
    value = found[0].get("valueUnsignedInt", found[0].get("valueInteger"))
    if len(found) > 1 or isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _invalid(
            "The backport-heartbeat-period extension must be one positive integer (seconds, "
            "valueUnsignedInt)",
            "Subscription.channel.extension",
        )
    return value


def endpoint_allowed(endpoint: str, prefixes: Sequence[str]) -> bool:
    """Whether `endpoint` starts with one of the operator's allowed URL prefixes
    (FACADE_SUBSCRIPTION_ENDPOINTS; none: nothing is allowed)."""
    return any(endpoint.startswith(prefix) for prefix in prefixes if prefix)
