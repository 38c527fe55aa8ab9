"""`_summary` and `_elements` (FHIR R4 search.html#summary, #elements): subsets of a resource.

Which elements are summary or mandatory comes from the R4B models of `fhir.resources`, so the
tables are the specification's own, not a hand-kept list.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from fhir.resources.R4B import get_fhir_model_class

__all__ = ["apply_elements", "apply_summary"]

_SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
    "display": "subsetted",
}
_ALWAYS = frozenset({"resourceType", "id", "meta"})


@cache
def _element_sets(resource_type: str) -> tuple[frozenset[str], frozenset[str]]:
    """(summary elements, mandatory elements) of a resource type, by JSON name."""
    model = get_fhir_model_class(resource_type)
    summary, mandatory = set(), set()
    for field in model.model_fields.values():
        extra = field.json_schema_extra
        if not isinstance(extra, dict) or not extra.get("element_property"):
            continue
        name = field.alias or ""
        if extra.get("summary_element_property"):
            summary.add(name)
        if extra.get("element_required") or field.is_required():
            mandatory.add(name)
    return frozenset(summary), frozenset(mandatory)


def _tagged(resource: dict[str, Any]) -> dict[str, Any]:
    meta = dict(resource.get("meta", {}))
    tags = meta.get("tag", [])
    meta["tag"] = tags if _SUBSETTED in tags else [*tags, _SUBSETTED]
    resource["meta"] = meta
    return resource


def _keep(resource: dict[str, Any], names: frozenset[str]) -> dict[str, Any]:
    # Primitive extensions travel as "_name" next to "name".
    return {k: v for k, v in resource.items() if k in names or k.lstrip("_") in names}


def apply_summary(resource: dict[str, Any], mode: str | None) -> dict[str, Any]:
    """Return the `_summary` form: true = summary elements, text = text + mandatory, data = no text."""
    if mode in (None, "false", "count"):
        return resource
    summary, mandatory = _element_sets(resource["resourceType"])
    if mode == "true":
        subset = _keep(resource, summary | mandatory | _ALWAYS)
    elif mode == "text":
        subset = _keep(resource, mandatory | _ALWAYS | {"text"})
    else:  # data
        subset = {k: v for k, v in resource.items() if k != "text"}
    return _tagged(subset)


def apply_elements(resource: dict[str, Any], elements: tuple[str, ...]) -> dict[str, Any]:
    """Return only the named top-level elements, plus the mandatory ones (search.html#elements)."""
    if not elements:
        return resource
    _, mandatory = _element_sets(resource["resourceType"])
    return _tagged(_keep(resource, frozenset(elements) | mandatory | _ALWAYS))
