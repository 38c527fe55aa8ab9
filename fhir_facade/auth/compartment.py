"""Which resources belong to a patient: the rules that confine `patient/` scopes.

The rules are the registry's (fhir_facade/fhir/registry.py, `PatientCompartment`): derived from
the FHIR R4 Patient CompartmentDefinition (compartmentdefinition-patient.html) and the search
parameters the facade serves, plus the facade's own rules for Device and Provenance
(capability/resource-types.json). Each rule names the search parameter that confines a search on
the server side (so another patient's data is never fetched from the PACS or the store) and the
elements whose references decide membership of one resource (checked on every read, and again on
every search result as a second line of defence).

Types outside the compartment hold no patient data here (Endpoint: the PACS's service addresses;
conformance artifacts; an algorithm Device with no `patient`): a `patient/` scope for them grants them
unconfined, as SMART leaves to the server (ADR 0008).
"""

from __future__ import annotations

import re
from typing import Any

from fhir_facade.fhir.element_paths import references_at
from fhir_facade.fhir.registry import PatientCompartment, registry

__all__ = ["CompartmentRule", "compartment_rule", "local_references", "patient_references", "references_at"]

#: How one type relates to the Patient compartment (the registry's facts).
CompartmentRule = PatientCompartment


def compartment_rule(resource_type: str) -> CompartmentRule | None:
    """The rule for `resource_type`, or None when the type holds no patient data here."""
    return registry().patient_compartment(resource_type)


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
    """(type, id) of a reference that looks local. Deliberately laxer than fhir.references.local_target:
    an id outside the FHIR id pattern still counts as a local target here, so `check_references`
    refuses it (nothing of that id is known) instead of letting an unchecked reference through."""
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
