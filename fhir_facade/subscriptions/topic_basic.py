"""The topics readable as resources: each SubscriptionTopic as the `Basic`-wrapped R4 form, served
read-only as `GET /fhir/Basic/{id}` and found by `GET /fhir/Basic?code=http://hl7.org/fhir/fhir-types|SubscriptionTopic`.

Which standard: the Subscriptions R5 Backport IG 1.1.0 (STU 1.1) leaves topic definitions out of
scope for R4 (components.html, "Subscription Topics in R4": discovery by the CapabilityStatement's
`capabilitystatement-subscriptiontopic-canonical` extension, which the facade has) and defines no
`$topic-list` (that operation was in the 0.1.0 ballot only). Its next version (1.2.0-ballot, same
section) recommends the `Basic`-wrapped topic and discovery by `Basic.code` =
`http://hl7.org/fhir/fhir-types#SubscriptionTopic`; its example `Basic/r4-encounter-complete`
carries the elements as cross-version extensions: the simple ones as
`http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic.<element>`, `status` as
a modifierExtension, and the backbone elements (resourceTrigger, eventTrigger, canFilterBy,
notificationShape) as `http://hl7.org/fhir/4.3/StructureDefinition/extension-SubscriptionTopic.<element>`
with one nested extension per child element (url = the child's name). This module writes exactly
that shape from the R4B content in capability/topics/ (docs/adr/0026-subscriptions-design.md).

Basic is no stored type of this facade (capability/resource-types.json): this provider is the only
`Basic` there is, and it inherits the provider defaults for writes (405), so a topic can be neither
written nor deleted through the API.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fhir_facade.fhir.search import SearchClause, SearchParamDef, SearchParamType, TokenValue
from fhir_facade.resources.fixed_set import FixedSetProvider

__all__ = ["FHIR_TYPES", "TopicBasicProvider", "topic_as_basic"]

FHIR_TYPES = "http://hl7.org/fhir/fhir-types"
_R5 = "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic."
_R4B = "http://hl7.org/fhir/4.3/StructureDefinition/extension-SubscriptionTopic."
_SPEC = "http://hl7.org/fhir/SearchParameter/"

#: Simple elements of SubscriptionTopic -> the value[x] type their R5 extension carries.
_SIMPLE = (
    ("url", "valueUri"),
    ("version", "valueString"),
    ("name", "valueString"),
    ("title", "valueString"),
    ("date", "valueDateTime"),
    ("description", "valueMarkdown"),
)
#: Backbone elements -> {child element: value[x] type} (R4B SubscriptionTopic).
_BACKBONES: dict[str, dict[str, str]] = {
    "resourceTrigger": {
        "description": "valueMarkdown",
        "resource": "valueUri",
        "supportedInteraction": "valueCode",
        "fhirPathCriteria": "valueString",
    },
    "eventTrigger": {"description": "valueMarkdown", "event": "valueCodeableConcept", "resource": "valueUri"},
    "canFilterBy": {
        "description": "valueMarkdown",
        "resource": "valueUri",
        "filterParameter": "valueString",
        "modifier": "valueCode",
    },
    "notificationShape": {"resource": "valueUri", "include": "valueString", "revInclude": "valueString"},
}


def _children(element: dict[str, Any], types: dict[str, str]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for name, value_type in types.items():
        value = element.get(name)
        for item in value if isinstance(value, list) else ([] if value is None else [value]):
            found.append({"url": name, value_type: item})
    return found


def topic_as_basic(topic: dict[str, Any]) -> dict[str, Any]:
    """The R4B SubscriptionTopic `topic` as the IG's Basic-wrapped R4 topic (same id)."""
    extensions = [
        {"url": _R5 + name, value_type: topic[name]} for name, value_type in _SIMPLE if name in topic
    ]
    for name, types in _BACKBONES.items():
        for element in topic.get(name, []):
            extensions.append({"url": _R4B + name, "extension": _children(element, types)})
    return {
        "resourceType": "Basic",
        "id": topic["id"],
        "modifierExtension": [{"url": _R5 + "status", "valueCode": topic["status"]}],
        "extension": extensions,
        "code": {"coding": [{"system": FHIR_TYPES, "code": "SubscriptionTopic"}]},
    }


def _token_matches(resource: dict[str, Any], name: str, value: TokenValue) -> bool:
    if name == "_id":
        return value.code == resource["id"]
    return any(
        (value.code is None or value.code == coding.get("code"))
        and (value.system is None or value.system == coding.get("system", ""))
        for coding in resource["code"]["coding"]
    )


class TopicBasicProvider(FixedSetProvider):
    """Read and search (`_id`, `code`) over the Basic-wrapped topics; writes answer 405."""

    resource_type = "Basic"
    documentation = (
        "Read-only: the subscription topics this server serves, as Basic-wrapped SubscriptionTopics "
        "(cross-version extensions, as the Subscriptions Backport IG's Basic/r4-encounter-complete). "
        "Find them with code=http://hl7.org/fhir/fhir-types|SubscriptionTopic."
    )
    search_params = (
        SearchParamDef("_id", SearchParamType.TOKEN, "Logical id", _SPEC + "Resource-id"),
        SearchParamDef("code", SearchParamType.TOKEN, "Kind of resource", _SPEC + "Basic-code"),
    )

    def __init__(self, topics: Iterable[dict[str, Any]]) -> None:
        super().__init__({t["id"]: topic_as_basic(t) for t in topics})

    def clause_matches(self, resource: dict[str, Any], clause: SearchClause) -> bool:
        return any(
            isinstance(value, TokenValue) and _token_matches(resource, clause.param.name, value)
            for value in clause.values
        )
