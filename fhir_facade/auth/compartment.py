"""Which resources belong to a patient: the rules that confine `patient/` scopes.

Based on the FHIR R4 Patient CompartmentDefinition (compartmentdefinition-patient.html), limited to the
types this server serves. Each rule names the search parameter that confines a search on the server
side (so another patient's data is never fetched from the PACS or the store) and the elements whose
references decide membership of one resource (checked on every read, and again on every search
result as a second line of defence).

Types outside the compartment hold no patient data here (Endpoint: the PACS's service addresses;
conformance artifacts; an algorithm Device with no `patient`): a `patient/` scope for them grants them
unconfined, as SMART leaves to the server (ADR 0008).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["CompartmentRule", "compartment_rule", "local_references", "patient_references"]


@dataclass(frozen=True)
class CompartmentRule:
    """How one type relates to the Patient compartment."""

    #: Search parameter (Reference to Patient, or `_id` for Patient itself) added to confined searches;
    #: None: the type has none here, so results are filtered after the search.
    search_param: str | None
    #: Dotted element paths whose Reference values place a resource in a patient's compartment.
    elements: tuple[str, ...] = ()
    #: A resource of this type with no reference at `elements` holds no patient data (e.g. an
    #: algorithm Device) rather than being outside every compartment.
    unreferenced_is_shared: bool = False
    #: Membership follows the targets (Provenance: it is about the resources it targets).
    via_targets: bool = False


_RULES: dict[str, CompartmentRule] = {
    "Patient": CompartmentRule("_id"),
    "ImagingStudy": CompartmentRule("patient", ("subject",)),
    "ServiceRequest": CompartmentRule("patient", ("subject",)),
    "DiagnosticReport": CompartmentRule("patient", ("subject",)),
    "Observation": CompartmentRule("patient", ("subject",)),
    "Task": CompartmentRule("patient", ("for",)),
    "AuditEvent": CompartmentRule("patient", ("entity.what", "agent.who")),
    "Device": CompartmentRule(None, ("patient",), unreferenced_is_shared=True),
    "Provenance": CompartmentRule(None, ("target",), via_targets=True),
}


def compartment_rule(resource_type: str) -> CompartmentRule | None:
    """The rule for `resource_type`, or None when the type holds no patient data here."""
    return _RULES.get(resource_type)


def _values(node: Any, path: list[str]) -> Iterator[Any]:
    if isinstance(node, list):
        for item in node:
            yield from _values(item, path)
        return
    if not path:
        yield node
        return
    if isinstance(node, dict):
        yield from _values(node.get(path[0]), path[1:])


def references_at(resource: dict[str, Any], elements: tuple[str, ...]) -> list[str]:
    """The `reference` strings at the dotted `elements` of `resource`."""
    found: list[str] = []
    for element in elements:
        for value in _values(resource, element.split(".")):
            if isinstance(value, dict) and isinstance(value.get("reference"), str):
                found.append(value["reference"])
    return found


def patient_references(resource: dict[str, Any], rule: CompartmentRule, base_url: str) -> set[str]:
    """The Patient ids `resource` refers to at the rule's elements (relative or absolute to our base)."""
    ids: set[str] = set()
    for reference in references_at(resource, rule.elements):
        if reference.startswith(base_url + "/"):
            reference = reference[len(base_url) + 1 :]
        kind, _, rest = reference.partition("/")
        if kind == "Patient" and rest and "/" not in rest:
            ids.add(rest)
    return ids


_TYPE_NAME = re.compile(r"^[A-Z][A-Za-z]{1,63}$")


def local_references(resource: dict[str, Any], base_url: str) -> list[tuple[str, tuple[str, str]]]:
    """Every literal reference in `resource` (contained resources included) to a resource on this
    server, as (element path, (type, id)); a versioned reference names its resource. References to
    other servers, contained resources (`#id`) and unresolved `urn:uuid:` placeholders are skipped:
    they name nothing this server holds."""
    found: list[tuple[str, tuple[str, str]]] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, list):
            for index, item in enumerate(node):
                walk(item, f"{path}[{index}]")
        elif isinstance(node, dict):
            reference = node.get("reference")
            if isinstance(reference, str):
                target = _local_target(reference, base_url)
                if target is not None:
                    found.append((f"{path}.reference", target))
            for key, value in node.items():
                if isinstance(value, (dict, list)):
                    walk(value, f"{path}.{key}")

    walk(resource, str(resource.get("resourceType", "Resource")))
    return found


def _local_target(reference: str, base_url: str) -> tuple[str, str] | None:
    if reference.startswith(base_url + "/"):
        reference = reference[len(base_url) + 1 :]
    elif "://" in reference or reference.startswith(("#", "urn:")):
        return None
    parts = reference.split("/")
    if len(parts) not in (2, 4) or not _TYPE_NAME.match(parts[0]) or not parts[1]:
        return None
    if len(parts) == 4 and parts[2] != "_history":
        return None
    return parts[0], parts[1]
