"""Walking a resource along a simple element path: the one FHIRPath subset the facade evaluates.

The paths are those of the R4 SearchParameter expressions as capability/search-parameters.json
writes them (scripts/generate_registry.py): child steps only (`Task.for`, `AuditEvent.agent.who`),
arrays flattened at every step (FHIRPath's collection semantics, fhirpath.html#paths), and
`name[x]` for a choice element, matching every `nameType` key of the JSON form
(json.html#choice). A first step naming a type (`Observation.subject`, `Resource.id`) is the
resource itself: element names start with a lower-case letter, type names never do. No functions:
`where(resolve() is Patient)` is the registry's `resolves_to`, applied by the caller.

The store's indexing, patient-compartment membership and `_include` all walk resources with
`values_at`, so a path means the same thing to each of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["references_at", "values_at"]


def _steps(path: str) -> list[str]:
    steps = path.split(".")
    if steps and steps[0][:1].isupper():
        return steps[1:]
    return steps


def _walk(node: Any, steps: list[str]) -> Iterator[Any]:
    if isinstance(node, list):
        for item in node:
            yield from _walk(item, steps)
        return
    if not steps:
        if node is not None:
            yield node
        return
    if not isinstance(node, dict):
        return
    step, rest = steps[0], steps[1:]
    if step.endswith("[x]"):
        stem = step[:-3]
        for key, value in node.items():
            if key.startswith(stem) and key[len(stem) : len(stem) + 1].isupper():
                yield from _walk(value, rest)
    elif step in node:
        yield from _walk(node[step], rest)


def values_at(resource: dict[str, Any], path: str) -> Iterator[Any]:
    """Every value at `path` in `resource` (lists flattened, choice elements expanded)."""
    yield from _walk(resource, _steps(path))


def references_at(resource: dict[str, Any], paths: tuple[str, ...] | list[str]) -> list[str]:
    """The `reference` strings of the Reference values at `paths` (FHIR references.html#Reference),
    in path order; contained and logical (identifier-only) references have none and are skipped."""
    found: list[str] = []
    for path in paths:
        for value in values_at(resource, path):
            if isinstance(value, dict) and isinstance(value.get("reference"), str):
                found.append(value["reference"])
    return found
