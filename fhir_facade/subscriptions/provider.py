"""Subscription as a stored type with the Backport IG's rules (docs/adr/0026-subscriptions-design.md).

- The shape is checked before anything is stored (backport.py): a topic the server serves, filters
  the topic allows, a rest-hook or websocket channel, a known payload content, a positive
  heartbeat period; a 422 names the element.
- A rest-hook endpoint must start with one of FACADE_SUBSCRIPTION_ENDPOINTS (422 otherwise): no
  request can make the server POST to an arbitrary host. A websocket subscription has no endpoint:
  its client connects (docs/adr/0028-websocket-channel.md).
- The server manages `active` and `error` (IG, "Subscription status"): a client creates a
  subscription `requested` (whatever it sends, except `off`), may set `requested` again or `off`
  later, but never `active` or `error`; the handshake makes it `active`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fhir_facade.auth.access import current_access
from fhir_facade.fhir.errors import error
from fhir_facade.resources.stored import StoredResourceProvider
from fhir_facade.store import ResourceStore
from fhir_facade.subscriptions.backport import SUBSCRIPTION_PROFILE, endpoint_allowed, parse_subscription
from fhir_facade.subscriptions.topics import Topic

__all__ = ["TOPIC_CANONICAL_EXTENSION", "SubscriptionProvider"]

#: CapabilityStatement.rest.resource extension naming each topic (Backport IG 1.1.0).
TOPIC_CANONICAL_EXTENSION = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/capabilitystatement-subscriptiontopic-canonical"
_SERVER_MANAGED = frozenset({"active", "error"})


class SubscriptionProvider(StoredResourceProvider):
    def __init__(self, store: ResourceStore, topics: dict[str, Topic], endpoints: Sequence[str]) -> None:
        super().__init__("Subscription", store)
        self.profile = SUBSCRIPTION_PROFILE  # type: ignore[misc]
        self.documentation = (  # type: ignore[misc]
            "Topic-based (Subscriptions R5 Backport IG 1.1.0): criteria = a topic canonical; channel "
            "rest-hook (to an allowed endpoint) or websocket ($get-ws-binding-token, then "
            "'bind-with-token <token>' on the returned websocket-url); payload empty / id-only / "
            "full-resource; backport-heartbeat-period honoured. Not synced upstream."
        )
        self.capability_extensions = tuple(  # type: ignore[misc]
            {"url": TOPIC_CANONICAL_EXTENSION, "valueCanonical": url} for url in sorted(topics)
        )
        self._topics = topics
        self._endpoints = tuple(endpoints)

    def prepare(self, resource: dict[str, Any], current: dict[str, Any] | None) -> dict[str, Any]:
        if current_access.get() is None:
            return resource  # the server itself (handshake, error, recovery)
        status = resource.get("status")
        if current is None:
            return {**resource, "status": "off" if status == "off" else "requested"}
        if status in _SERVER_MANAGED and status != current.get("status"):
            raise error(
                422,
                "business-rule",
                f"Subscription.status {status!r} is set by the server (handshake, delivery failures); "
                "a client may ask for 'requested' or 'off'",
                detail_code="subscription_invalid",
                expression=("Subscription.status",),
            )
        return resource

    async def check(self, resource: dict[str, Any]) -> None:
        spec = parse_subscription(resource, self._topics)
        if spec.channel == "rest-hook" and not endpoint_allowed(spec.endpoint, self._endpoints):
            raise error(
                422,
                "business-rule",
                f"channel.endpoint {spec.endpoint!r} is not one this server may call "
                "(FACADE_SUBSCRIPTION_ENDPOINTS lists the allowed URL prefixes)",
                detail_code="subscription_endpoint_refused",
                expression=("Subscription.channel.endpoint",),
            )
