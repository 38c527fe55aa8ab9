"""The procedure catalogue: which DICOM modality, procedure code and description an order's code means.

EHRs order imaging with LOINC (RSNA/LOINC Playbook), CPT, SNOMED CT or local procedure codes, almost
never with a DCM modality code, yet the Scheduled Procedure Step needs its Modality (0008,0060), Type 1
in PS3.4 Table K.6-1. The catalogue is data: FHIR R4 ConceptMaps (conceptmap.html) from a procedure code
system to DCM (PS3.16 CID 29), the bundled mappings/ConceptMap-procedure-to-modality.json plus an
optional site file or folder (FACADE_WORKLIST_PROCEDURE_MAP) whose entries take precedence. This is
the Order Filler's procedure catalogue of IHE Radiology Scheduled Workflow, kept as reviewable data.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from fhir_facade.fhir.ids import is_fhir_id
from fhir_facade.package_data import data_path

__all__ = [
    "BUNDLED_MAP_ID",
    "CatalogueEntry",
    "ProcedureCatalogue",
    "ProcedureMapError",
    "bundled_catalogue",
    "load_concept_maps",
]

BUNDLED_MAP_ID = "procedure-to-modality"
_DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
# A DCM acquisition modality is an upper-case CS term (PS3.3 C.7.3.1.1.1, CID 29).
_MODALITY = re.compile(r"[A-Z]{1,16}")
# R4 id type (datatypes.html#id): the site's map is served as ConceptMap/<id> next to the bundled one.
# ConceptMap equivalences that do not allow mapping (R4 valueset-concept-map-equivalence.html).
_NOT_MAPPING = frozenset({"unmatched", "disjoint"})


class ProcedureMapError(ValueError):
    """A procedure ConceptMap cannot be used; the message names the file and the element."""


@dataclass(frozen=True)
class CatalogueEntry:
    """One catalogued procedure: its code (system, code), the catalogue's name for it, and the modality."""

    system: str
    code: str
    description: str
    modality: str


class ProcedureCatalogue:
    """Lookup (system, code) -> CatalogueEntry over ConceptMaps; a later map overrides an earlier one."""

    def __init__(self, concept_maps: Iterable[Mapping[str, Any]] = ()) -> None:
        self.concept_maps: tuple[Mapping[str, Any], ...] = tuple(concept_maps)
        self._entries: dict[tuple[str, str], CatalogueEntry] = {}
        for resource in self.concept_maps:
            for entry in _entries(resource, str(resource.get("id", "?"))):
                self._entries[(entry.system, entry.code)] = entry

    def lookup(self, system: str, code: str) -> CatalogueEntry | None:
        return self._entries.get((system, code))

    def match(self, codings: Iterable[Mapping[str, Any]]) -> CatalogueEntry | None:
        """The entry of the first coding that the catalogue knows (CodeableConcept.coding order)."""
        for coding in codings:
            entry = self.lookup(str(coding.get("system", "")), str(coding.get("code", "")))
            if entry is not None:
                return entry
        return None

    def with_site_maps(self, path: Path | None) -> ProcedureCatalogue:
        """This catalogue extended by the site's ConceptMap file or folder (its entries win)."""
        if path is None:
            return self
        return ProcedureCatalogue([*self.concept_maps, *load_concept_maps(path)])

    def __len__(self) -> int:
        return len(self._entries)


def _entries(resource: Mapping[str, Any], where: str) -> list[CatalogueEntry]:
    """Validate one ConceptMap (every group maps to DCM, every element to one modality) and list it."""
    if resource.get("resourceType") != "ConceptMap":
        raise ProcedureMapError(f"{where}: not a ConceptMap (resourceType {resource.get('resourceType')!r})")
    groups = resource.get("group")
    if not isinstance(groups, list) or not groups:
        raise ProcedureMapError(f"{where}: ConceptMap.group is missing or empty")
    entries: list[CatalogueEntry] = []
    for g, group in enumerate(groups):
        at = f"{where}: group[{g}]"
        source = group.get("source") if isinstance(group, dict) else None
        if not isinstance(source, str) or not source:
            raise ProcedureMapError(f"{at}.source must name the procedure code system (a URI)")
        if group.get("target") != _DCM_SYSTEM:
            raise ProcedureMapError(f"{at}.target must be {_DCM_SYSTEM} (DICOM modalities, PS3.16 CID 29)")
        for e, element in enumerate(group.get("element") or []):
            code = element.get("code") if isinstance(element, dict) else None
            if not isinstance(code, str) or not code.strip():
                raise ProcedureMapError(f"{at}.element[{e}].code is missing")
            targets = [t for t in element.get("target") or [] if t.get("equivalence") not in _NOT_MAPPING]
            if len(targets) != 1:
                raise ProcedureMapError(
                    f"{at}.element[{e}] ({code}) needs exactly one mapping target, found {len(targets)}"
                )
            modality = str(targets[0].get("code", ""))
            if not _MODALITY.fullmatch(modality):
                raise ProcedureMapError(
                    f"{at}.element[{e}].target[0].code {modality!r} is not a DICOM modality "
                    "(upper-case defined term of PS3.3 C.7.3.1.1.1, e.g. MR, CT)"
                )
            description = str(element.get("display") or code)
            entries.append(CatalogueEntry(source, code, description, modality))
    return entries


def _read(file: Path) -> dict[str, Any]:
    try:
        resource = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProcedureMapError(f"{file}: cannot be read as JSON ({exc})") from exc
    if not isinstance(resource, dict):
        raise ProcedureMapError(f"{file}: not a JSON object")
    _entries(resource, str(file))  # validates, naming the file
    return resource


def load_concept_maps(path: Path) -> list[dict[str, Any]]:
    """The procedure ConceptMaps of a site: one JSON file, or every *.json of a folder (name order).

    Raises `ProcedureMapError` naming the file and element at fault, so start-up fails clearly."""
    if path.is_dir():
        files: Sequence[Path] = sorted(path.glob("*.json"))
        if not files:
            raise ProcedureMapError(f"{path}: folder holds no *.json ConceptMap")
    elif path.is_file():
        files = [path]
    else:
        raise ProcedureMapError(f"{path}: no such file or folder")
    maps = [_read(file) for file in files]
    for file, resource in zip(files, maps, strict=True):
        map_id = resource.get("id")
        if not isinstance(map_id, str) or not is_fhir_id(map_id) or map_id == BUNDLED_MAP_ID:
            raise ProcedureMapError(
                f"{file}: ConceptMap.id {map_id!r} must be a FHIR id other than {BUNDLED_MAP_ID!r} "
                "(the site's map is served beside the bundled one)"
            )
    return maps


@cache
def bundled_catalogue() -> ProcedureCatalogue:
    """The catalogue shipped in mappings/ (parsed once per process)."""
    return ProcedureCatalogue([_read(data_path("mappings") / f"ConceptMap-{BUNDLED_MAP_ID}.json")])
