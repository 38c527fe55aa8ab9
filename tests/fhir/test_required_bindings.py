"""The required-bindings table (capability/required-bindings.json) and its checker, without a
server: the table is what scripts/generate_required_bindings.py makes from the FHIR R4
definitions (no drift); every type/element pair in it accepts each code of its value set and
refuses one outside it, found where a client would put it; the table agrees with the second
source we have, the R4B models' enum lists."""

from __future__ import annotations

import importlib.util
import json
import os
from collections import deque
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from fhir_facade.fhir.required_bindings import binding_issues, required_bindings
from fhir_facade.package_data import data_path
from fhir_facade.resources.stored import PERSISTENT_TYPES

REPO = Path(__file__).resolve().parents[2]
TABLE = required_bindings()
BAD = "not-a-code"


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location(
        "generate_required_bindings", REPO / "scripts/generate_required_bindings.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_table_is_what_the_script_makes() -> None:
    generator = _generator()
    if not (generator.DEFINITIONS / "profiles-resources.json").exists():
        reason = f"{generator.DEFINITIONS} is missing: run scripts/setup.sh"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    committed = (data_path("capability") / "required-bindings.json").read_text(encoding="utf-8")
    assert generator.render(generator.build()) == committed, "run scripts/generate_required_bindings.py"


def test_every_stored_type_is_covered() -> None:
    assert {*PERSISTENT_TYPES, "Patient"} == TABLE.resource_types


def _route(prefix: str) -> tuple[str, list[str]]:
    """The shortest path of element names from a stored resource type to `prefix` (a resource
    type, datatype or backbone element), through the table's elements: (type, names)."""
    queue: deque[tuple[str, str, list[str]]] = deque((t, t, []) for t in sorted(TABLE.resource_types))
    seen = set(TABLE.resource_types)
    while queue:
        at, resource_type, steps = queue.popleft()
        if at == prefix:
            return resource_type, steps
        for key, target in sorted(TABLE.elements.items()):
            parent, name = key.rsplit(".", 1)
            if parent == at and target not in seen and target != "Resource":
                seen.add(target)
                queue.append((target, resource_type, [*steps, name]))
    raise AssertionError(f"{prefix} is not reachable from a stored type")


def _resource_with(element: str, value: str) -> tuple[dict[str, Any], str]:
    """A resource that holds `value` at the element key (e.g. `Identifier.use`), and the
    expression the checker must report for it."""
    prefix, name = element.rsplit(".", 1)
    resource_type, steps = _route(prefix)
    resource: dict[str, Any] = {"resourceType": resource_type}
    node = resource
    for step in steps:
        node[step] = {}
        node = node[step]
    node[name] = value
    return resource, ".".join([resource_type, *steps, name])


#: Members of the value sets defined by an external grammar (the table names the grammar).
FORMAT_SAMPLES = {
    "bcp13-mime-type": ["text/plain", "application/dicom", 'text/plain; charset="UTF-8"'],
    "iso4217-currency": ["EUR", "USD"],
}
RAW = json.loads((data_path("capability") / "required-bindings.json").read_text(encoding="utf-8"))


def _members(value_set: str) -> list[str]:
    members = RAW["valueSets"][value_set]
    return FORMAT_SAMPLES[members["format"]] if isinstance(members, dict) else sorted(members)


@pytest.mark.parametrize("element", sorted(TABLE.bindings))
def test_each_binding_takes_its_codes_and_refuses_others(element: str) -> None:
    value_set = TABLE.bindings[element]
    for code in _members(value_set):
        resource, _ = _resource_with(element, code)
        assert binding_issues(resource) == [], (element, code)
    resource, expression = _resource_with(element, BAD)
    (issue,) = binding_issues(resource)
    assert (issue.code, issue.expression) == ("code-invalid", (expression,))
    assert value_set in issue.diagnostics


def test_repeating_elements_contained_resources_and_primitive_extensions() -> None:
    resource = {
        "resourceType": "Observation",
        "status": "final",
        "component": [
            {"valueQuantity": {"comparator": "<"}},
            {"valueQuantity": {"comparator": "about"}},
        ],
        "contained": [{"resourceType": "Patient", "gender": "banana"}],
        "effectiveTiming": {"repeat": {"dayOfWeek": ["mon", "someday"]}},
        "_status": {"extension": [{"url": "urn:x", "valueIdentifier": {"use": "sideways"}}]},
    }
    assert sorted(e for issue in binding_issues(resource) for e in issue.expression) == [
        "Observation._status.extension[0].valueIdentifier.use",
        "Observation.component[1].valueQuantity.comparator",
        "Observation.contained[0].gender",
        "Observation.effectiveTiming.repeat.dayOfWeek[1]",
    ]


def test_types_outside_the_table_are_not_checked() -> None:
    """The virtual resources are built by the server and never written; they are not checked."""
    assert binding_issues({"resourceType": "ImagingStudy", "status": "whatever"}) == []


def _top_level_code_bindings() -> list[str]:
    return [
        k for k in sorted(TABLE.bindings) if k.split(".")[0] in TABLE.resource_types and k.count(".") == 1
    ]


@pytest.mark.parametrize("element", _top_level_code_bindings())
def test_the_r4b_models_agree_where_they_list_codes(element: str) -> None:
    """fhir.resources' R4B models list some codes in their field metadata (`enum_values`, cut
    short with "+" after four): what they list is in our R4 value set, and complete lists match."""
    resource_type, name = element.split(".")
    field = get_fhir_model_class(resource_type).model_fields[name]
    listed = (field.json_schema_extra or {}).get("enum_values")  # type: ignore[union-attr]
    if not listed:
        pytest.skip(f"R4B lists no codes for {element}")
    ours = TABLE.codes[TABLE.bindings[element]]
    if "+" in listed:
        assert set(listed) - {"+"} < ours
    else:
        assert set(listed) == ours
