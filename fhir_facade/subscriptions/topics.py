"""The subscription topics the facade serves: data in capability/SubscriptionTopic-*.json (R4B
SubscriptionTopic content, which the Subscriptions R5 Backport IG 1.1.0 lets an R4 server name by
canonical URL), loaded once.

A topic names its resource type, the interactions that trigger it and its filter parameters, which
are search parameters of the registry (docs/adr/0023-resource-type-registry.md): a filter is
evaluated on the index rows the store extracts for that parameter, so `status=final` matches here
exactly as it does in a search. The trigger's `fhirPathCriteria` is not evaluated by a FHIRPath
engine: only the expressions in `_CRITERIA` are known, and a topic using another fails loading.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from fhir_facade.fhir.registry import RegistryError, registry
from fhir_facade.fhir.search import SearchParamType
from fhir_facade.package_data import data_path
from fhir_facade.store.indexing import extract_index

__all__ = ["Filter", "Topic", "load_topics", "topics"]

Resource = dict[str, Any]


def _created_or_status_changed(before: Resource | None, after: Resource | None) -> bool:
    if after is None:
        return False
    return before is None or before.get("status") != after.get("status")


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

    def triggered(self, change: str, before: Resource | None, after: Resource | None) -> bool:
        """Whether a `change` (create/update/delete) from `before` to `after` is an event of this topic."""
        return change in self.interactions and self.criteria(before, after)

    def matches(self, filters: tuple[Filter, ...], resource: Resource) -> bool:
        """All filters hold for `resource` (Backport IG: filters are ANDed), evaluated on its index rows."""
        if not filters:
            return True
        rows = extract_index(resource)
        facts = registry().facts(self.resource_type)
        for item in filters:
            param = facts.param(item.parameter) if facts else None
            if param is None:
                return False
            if param.type is SearchParamType.TOKEN:
                system, bar, code = item.value.rpartition("|")
                ok = any(
                    name == item.parameter and c == code and (not bar or (s or "") == system)
                    for name, s, c in rows.tokens
                )
            elif param.type is SearchParamType.REFERENCE:
                wanted = item.value
                ok = any(
                    name == item.parameter and (ref == wanted or f"{t}/{i}" == wanted or i == wanted)
                    for name, t, i, ref in rows.references
                )
            else:
                ok = False
            if not ok:
                return False
        return True


def load_topics(folder: Any = None) -> dict[str, Topic]:
    """Every capability/SubscriptionTopic-*.json by canonical URL; RegistryError on a topic whose
    trigger or filters the facade cannot evaluate."""
    folder = folder or data_path("capability")
    found: dict[str, Topic] = {}
    for path in sorted(folder.glob("SubscriptionTopic-*.json")):
        resource = json.loads(path.read_text(encoding="utf-8"))
        (trigger,) = resource["resourceTrigger"]
        resource_type = str(trigger["resource"]).rsplit("/", 1)[-1]
        criteria = _CRITERIA.get(trigger.get("fhirPathCriteria", ""))
        if criteria is None:
            raise RegistryError(f"{path.name}: trigger criteria {trigger.get('fhirPathCriteria')!r} unknown")
        facts = registry().facts(resource_type)
        if facts is None or not facts.stored:
            raise RegistryError(f"{path.name}: {resource_type} is not a stored type")
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
        )
    return found


@cache
def topics() -> dict[str, Topic]:
    """The shipped topics (loaded once)."""
    return load_topics()
