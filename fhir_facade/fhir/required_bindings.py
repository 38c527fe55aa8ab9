"""Required terminology bindings of written resources (R4 terminologies.html#required: "To be
conformant, the concept in this element SHALL be from the specified value set").

The R4B models (`fhir.resources`) type coded elements as plain strings and enforce no value set,
so `Task.status "bogus"` used to be stored. The table of required bindings is data,
capability/required-bindings.json, generated from the FHIR R4 definitions by
scripts/generate_required_bindings.py (ADR 0015). `binding_issues` walks a resource along that
table: into datatypes, backbone elements, extensions and contained resources, with choice types
under their JSON names. Every required binding of the types the facade stores is on a `code`
element, so a code is checked against the value set's codes (its system is implied).
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any, NamedTuple

from fhir_facade.fhir.errors import FhirError, Issue
from fhir_facade.package_data import data_path

__all__ = ["RequiredBindings", "binding_issues", "check_required_bindings", "required_bindings"]

#: RFC 6838 section 4.2 type/subtype names, then RFC 2045 section 5.1 parameters: BCP 13.
_MIME_NAME = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MIME_TYPE = re.compile(rf"{_MIME_NAME}/{_MIME_NAME}(?:\s*;\s*{_TOKEN}=(?:{_TOKEN}|\"(?:[^\"\\]|\\.)*\"))*")
#: Value sets defined by an external grammar (the table says which), checked for form only.
_FORMATS: dict[str, re.Pattern[str]] = {
    "bcp13-mime-type": _MIME_TYPE,
    "iso4217-currency": re.compile(r"[A-Z]{3}"),  # ISO 4217 alphabetic codes
}


class RequiredBindings(NamedTuple):
    """capability/required-bindings.json, loaded."""

    resource_types: frozenset[str]
    bindings: dict[str, str]
    elements: dict[str, str]
    codes: dict[str, frozenset[str]]
    formats: dict[str, re.Pattern[str]]

    def allows(self, value_set: str, code: str) -> bool:
        if value_set in self.formats:
            return self.formats[value_set].fullmatch(code) is not None
        return code in self.codes[value_set]


@cache
def required_bindings() -> RequiredBindings:
    """The generated table (read once)."""
    path = data_path("capability") / "required-bindings.json"
    table = json.loads(path.read_text(encoding="utf-8"))
    codes: dict[str, frozenset[str]] = {}
    formats: dict[str, re.Pattern[str]] = {}
    for url, members in table["valueSets"].items():
        if isinstance(members, dict):
            formats[url] = _FORMATS[members["format"]]
        else:
            codes[url] = frozenset(members)
    return RequiredBindings(
        frozenset(table["resourceTypes"]), table["bindings"], table["elements"], codes, formats
    )


def _items(value: Any, expression: str) -> list[tuple[Any, str]]:
    if isinstance(value, list):
        return [(item, f"{expression}[{index}]") for index, item in enumerate(value)]
    return [(value, expression)]


def _walk(
    table: RequiredBindings, node: dict[str, Any], prefix: str, expression: str, issues: list[Issue]
) -> None:
    for key, value in node.items():
        if key.startswith("_"):  # a primitive's id and extensions (json.html#primitive)
            for item, where in _items(value, f"{expression}.{key}"):
                if isinstance(item, dict):
                    _walk(table, item, "Element", where, issues)
            continue
        element = f"{prefix}.{key}"
        value_set = table.bindings.get(element)
        if value_set is not None:
            for code, where in _items(value, f"{expression}.{key}"):
                if isinstance(code, str) and not table.allows(value_set, code):
                    issues.append(
                        Issue(
                            "code-invalid",
                            f"{where}: '{code}' is not in the value set {value_set}, which "
                            f"{element} is bound to with strength 'required'",
                            expression=(where,),
                        )
                    )
            continue
        target = table.elements.get(element)
        if target is None:
            continue
        for item, where in _items(value, f"{expression}.{key}"):
            if not isinstance(item, dict):
                continue
            if target == "Resource":  # contained: checked as its own type, where we know it
                contained_type = item.get("resourceType")
                if contained_type in table.resource_types:
                    _walk(table, item, str(contained_type), where, issues)
            else:
                _walk(table, item, target, where, issues)


def binding_issues(resource: dict[str, Any]) -> list[Issue]:
    """One `code-invalid` issue per coded element whose value is outside its required value
    set, each naming the element as a FHIRPath with indexes (`Observation.component[1]...`).
    A type the table does not cover gives none."""
    table = required_bindings()
    resource_type = resource.get("resourceType")
    if resource_type not in table.resource_types:
        return []
    issues: list[Issue] = []
    _walk(table, resource, str(resource_type), str(resource_type), issues)
    return issues


def check_required_bindings(resource: dict[str, Any]) -> None:
    """400 when a required binding is broken (http.html#create: "failed basic FHIR validation
    rules"; the issue type `code-invalid`, valueset-issue-type.html)."""
    issues = binding_issues(resource)
    if issues:
        raise FhirError(400, issues)
