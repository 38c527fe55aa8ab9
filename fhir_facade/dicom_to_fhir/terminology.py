"""Code lookups through the ConceptMaps in mappings/ (FHIR conceptmap.html), loaded once.

The tables are data that reviewers can read and the server can serve as ConceptMap resources;
this module only turns them into dicts of FHIR Codings.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from fhir_facade.package_data import data_path

__all__ = ["body_site_coding", "concept_map", "laterality_coding"]

BODY_PART_MAP_ID = "dicom-body-part-to-snomed"
LATERALITY_MAP_ID = "dicom-laterality-to-snomed"


@cache
def concept_map(map_id: str) -> dict[str, Any]:
    """The ConceptMap resource mappings/ConceptMap-<map_id>.json, parsed once per process."""
    path = data_path("mappings") / f"ConceptMap-{map_id}.json"
    with path.open(encoding="utf-8") as file:
        resource: dict[str, Any] = json.load(file)
    if resource.get("resourceType") != "ConceptMap" or resource.get("id") != map_id:
        raise ValueError(f"{path} is not ConceptMap/{map_id}")
    return resource


@cache
def _lookup(map_id: str) -> dict[str, dict[str, str]]:
    """source code -> target Coding, for the targets that are equivalent/equal/wider."""
    table: dict[str, dict[str, str]] = {}
    for group in concept_map(map_id).get("group", []):
        system = group["target"]
        for element in group.get("element", []):
            for target in element.get("target", []):
                if "code" not in target or target.get("equivalence") == "unmatched":
                    continue
                coding = {"system": system, "code": target["code"]}
                if target.get("display"):
                    coding["display"] = target["display"]
                table.setdefault(element["code"], coding)
    return table


def _coding(map_id: str, source_code: str | None) -> dict[str, str] | None:
    if not source_code:
        return None
    coding = _lookup(map_id).get(source_code.strip().upper())
    return dict(coding) if coding else None


def body_site_coding(body_part_examined: str | None) -> dict[str, str] | None:
    """Body Part Examined (0018,0015) -> SNOMED CT Coding (PS3.16 Annex L); None if unmapped."""
    return _coding(BODY_PART_MAP_ID, body_part_examined)


def laterality_coding(laterality: str | None) -> dict[str, str] | None:
    """Laterality (0020,0060) R/L/B -> SNOMED CT Coding of R4 bodysite-laterality; else None."""
    return _coding(LATERALITY_MAP_ID, laterality)
