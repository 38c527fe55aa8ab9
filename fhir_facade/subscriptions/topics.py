"""The subscription topics the facade serves: data in capability/topics/SubscriptionTopic-*.json (R4B
SubscriptionTopic content, which the Subscriptions R5 Backport IG 1.1.0 lets an R4 server name by
canonical URL), loaded once.

A topic names its resource type, what triggers it and its filter parameters, which are token or
reference search parameters of the registry (docs/adr/0023-resource-type-registry.md), evaluated
on the values at the parameter's element paths (fhir/element_paths.py, the walker the store's
index uses), so `status=final` selects here what the search selects.

Two kinds of trigger:
- a `resourceTrigger` on a stored type (a version written to the store); its `fhirPathCriteria` is
  not evaluated by a FHIRPath engine: only the expressions in `_CRITERIA` are known, and a topic
  using another fails loading;
- `eventTrigger`s on ImagingStudy with the codes `study-available` (a study became stable in the
  PACS for the first time: the watcher's `StudyArrived`, ADR 0022) and `study-changed` (it became
  stable again with other series or instances; study_changes.py), the live ImagingStudy being the
  focus. A topic names either or both.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from fhir_facade.fhir.element_paths import values_at
from fhir_facade.fhir.registry import RegistryError, registry
from fhir_facade.fhir.search import SearchParamType
from fhir_facade.package_data import data_path
from fhir_facade.subscriptions.study_changes import STUDY_AVAILABLE, STUDY_CHANGED, STUDY_DELETED

__all__ = ["STUDY_AVAILABLE", "STUDY_CHANGED", "Filter", "Topic", "load_topics", "topics"]

#: The event codes the facade raises (capability/CodeSystem-subscription-event.json).
_EVENT_CODES = frozenset({STUDY_AVAILABLE, STUDY_CHANGED, STUDY_DELETED})

Resource = dict[str, Any]


def _created_or_status_changed(before: Resource | None, after: Resource | None) -> bool:
    if after is None:
        return False
    return before is None or before.get("status") != after.get("status")


def _never(before: Resource | None, after: Resource | None) -> bool:
    return False


#: The trigger expressions the facade evaluates (a small, named subset of FHIRPath).
_CRITERIA: Mapping[str, Callable[[Resource | None, Resource | None], bool]] = {
    "%previous.empty() or (%previous.status != %current.status)": _created_or_status_changed,
}


@dataclass(frozen=True)
class Filter:
    """One `filterCriteria` of a Subscription: `parameter=value` (Backport IG: `Type?param=value`)."""

    parameter: str
    value: str


@dataclass(frozen=True)
class Topic:
    url: str
    resource_type: str
    interactions: frozenset[str]
    filter_parameters: frozenset[str]
    criteria: Callable[[Resource | None, Resource | None], bool]
    #: The SubscriptionTopic resource as shipped (R4B content).
    resource: Resource
    #: `study-available` for the study topic (an event topic), None for a resource trigger.
    event: str | None = None
    #: The codes of its eventTriggers (`study-available`, `study-changed`): the events it fires on.
    events: frozenset[str] = frozenset()

    def triggered(self, change: str, before: Resource | None, after: Resource | None) -> bool:
        """Whether a `change` (create/update/delete) from `before` to `after` is an event of this topic."""
        return self.event is None and change in self.interactions and self.criteria(before, after)

    def matches(self, filters: tuple[Filter, ...], resource: Resource) -> bool:
        """All filters hold for `resource` (Backport IG: filters are ANDed), evaluated on its index rows."""
        facts = registry().facts(self.resource_type)
        for item in filters:
            param = facts.param(item.parameter) if facts else None
            if param is None:
                return False
            values = [v for path in param.paths for v in values_at(resource, path)]
            if param.type is SearchParamType.TOKEN:
                system, bar, code = item.value.rpartition("|")
                ok = any(
                    c == code and (not bar or (s or "") == system) for v in values for s, c in _tokens(v)
                )
            elif param.type is SearchParamType.REFERENCE:
                ok = any(_reference_matches(v, item.value) for v in values)
            else:
                ok = False
            if not ok:
                return False
        return True


def _tokens(value: Any) -> list[tuple[str | None, str]]:
    """(system, code) pairs of a token value (search.html#token): code, Coding, CodeableConcept,
    Identifier."""
    if isinstance(value, str | bool):
        return [(None, str(value).lower() if isinstance(value, bool) else value)]
    if not isinstance(value, dict):
        return []
    if "coding" in value:
        return [p for coding in value.get("coding", []) for p in _tokens(coding)]
    code = value.get("code", value.get("value"))
    return [(value.get("system"), str(code))] if code is not None else []


def _reference_matches(value: Any, wanted: str) -> bool:
    """`wanted` (Type/id, an id, or an absolute URL) names the Reference `value`'s target."""
    reference = value.get("reference") if isinstance(value, dict) else None
    if not isinstance(reference, str):
        return False
    return reference == wanted or reference.rsplit("/", 1)[-1] == wanted or reference.endswith("/" + wanted)


def load_topics(folder: Any = None) -> dict[str, Topic]:
    """Every capability/topics/SubscriptionTopic-*.json by canonical URL; RegistryError on a topic
    whose trigger or filters the facade cannot evaluate. A folder of their own: SubscriptionTopic is
    no R4 resource type, so the conformance artifacts of capability/ (served as resources) must not
    include them; the Backport IG names topics by canonical URL in the CapabilityStatement."""
    folder = folder or data_path("capability") / "topics"
    found: dict[str, Topic] = {}
    for path in sorted(folder.glob("SubscriptionTopic-*.json")):
        resource = json.loads(path.read_text(encoding="utf-8"))
        event: str | None = None
        events: set[str] = set()
        if "eventTrigger" in resource:
            for trigger in resource["eventTrigger"]:
                codes = {c.get("code") for c in trigger.get("event", {}).get("coding", [])} & _EVENT_CODES
                if len(codes) != 1 or trigger.get("resource") != resource["eventTrigger"][0].get("resource"):
                    raise RegistryError(f"{path.name}: event trigger {trigger.get('event')} unknown")
                events |= codes
            trigger = resource["eventTrigger"][0]
            event = STUDY_AVAILABLE
            criteria: Callable[[Resource | None, Resource | None], bool] = _never
        else:
            (trigger,) = resource["resourceTrigger"]
            known = _CRITERIA.get(trigger.get("fhirPathCriteria", ""))
            if known is None:
                raise RegistryError(
                    f"{path.name}: trigger criteria {trigger.get('fhirPathCriteria')!r} unknown"
                )
            criteria = known
        resource_type = str(trigger["resource"]).rsplit("/", 1)[-1]
        facts = registry().facts(resource_type)
        if facts is None or not (
            facts.stored or (event == STUDY_AVAILABLE and resource_type == "ImagingStudy")
        ):
            raise RegistryError(f"{path.name}: {resource_type} cannot be a topic's resource")
        filters = frozenset(f["filterParameter"] for f in resource.get("canFilterBy", []))
        for name in filters:
            param = facts.param(name)
            if param is None or param.type not in (SearchParamType.TOKEN, SearchParamType.REFERENCE):
                raise RegistryError(f"{path.name}: filter {name} is not a token or reference parameter")
        found[resource["url"]] = Topic(
            resource["url"],
            resource_type,
            frozenset(trigger.get("supportedInteraction", [])),
            filters,
            criteria,
            resource,
            event,
            frozenset(events),
        )
    return found


@cache
def topics() -> dict[str, Topic]:
    """The shipped topics (loaded once)."""
    return load_topics()
