"""FHIR code system URI <-> DICOM Coding Scheme Designator (PS3.16 Section 8, Table 8-1).

One table, as data (mappings/coding-scheme-designators.json), for every place that writes a DICOM
Code Sequence item from a FHIR Coding: the worklist's Requested Procedure Code Sequence and the
analysis's Structured Report.
"""

from __future__ import annotations

import json
from functools import cache

from fhir_facade.package_data import data_path

__all__ = ["coding_scheme_designator", "coding_scheme_designators"]

_FILE = "coding-scheme-designators.json"


@cache
def coding_scheme_designators() -> dict[str, str]:
    """The whole table, FHIR system -> designator, read once per process."""
    with (data_path("mappings") / _FILE).open(encoding="utf-8") as file:
        table = json.load(file)["designators"]
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise ValueError(f"mappings/{_FILE}: designators must map system URIs to strings")
    return dict(table)


def coding_scheme_designator(system: str) -> str | None:
    """The designator of a FHIR code system, or None when DICOM registers none for it."""
    return coding_scheme_designators().get(system)
