"""The codes an analysis result is written with, each from a real terminology, with its source.

Model output labels are mapped through the ConceptMap the manifest names (mappings/), so a new
model brings its codes as data.
"""

from __future__ import annotations

import json
from functools import cache

from fhir_facade.analyze.manifest import ModelManifest
from fhir_facade.analyze.result import CodedConcept
from fhir_facade.package_data import data_path

__all__ = [
    "ANALYZE_CODE",
    "DCM",
    "FINDING",
    "IMAGING_CATEGORY",
    "IMAGING_REPORT",
    "LOINC",
    "RADIOLOGY_SECTION",
    "SNOMED",
    "TASK_CODE_SYSTEM",
    "UnmappedLabel",
    "label_concepts",
]

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
DCM = "http://dicom.nema.org/resources/ontology/DCM"

#: DICOM PS3.16 Annex D (DCM) 121071 "Finding": the concept name of a qualitative evaluation in
#: TID 1501 and the Observation.code of the DICOM-SR-to-FHIR IG's qualitative evaluation.
FINDING = CodedConcept(DCM, "121071", "Finding")
#: LOINC 18748-4 "Diagnostic imaging study" (LOINC Document Ontology): the DiagnosticReport.code.
IMAGING_REPORT = CodedConcept(LOINC, "18748-4", "Diagnostic imaging study")
#: HL7 v2 table 0074 (Diagnostic Service Section ID) "RAD": DiagnosticReport.category.
RADIOLOGY_SECTION = {
    "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
    "code": "RAD",
    "display": "Radiology",
}
#: The facade's own Task codes (capability/CodeSystem-task-code.json); `analyze` asks for an
#: analysis (the watcher creates such Tasks on arrival, the analysis worklist runs them).
TASK_CODE_SYSTEM = "http://fhir-facade.org/fhir/CodeSystem/task-code"
ANALYZE_CODE = {"system": TASK_CODE_SYSTEM, "code": "analyze", "display": "Analyze imaging study"}
#: FHIR observation-category "imaging": Observation.category.
IMAGING_CATEGORY = {
    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
    "code": "imaging",
    "display": "Imaging",
}


class UnmappedLabel(Exception):
    """A model label has no target in the manifest's ConceptMap (a packaging error)."""


@cache
def _concept_maps() -> dict[str, dict[str, CodedConcept]]:
    maps: dict[str, dict[str, CodedConcept]] = {}
    for path in sorted(data_path("mappings").glob("ConceptMap-*.json")):
        resource = json.loads(path.read_text(encoding="utf-8"))
        targets: dict[str, CodedConcept] = {}
        for group in resource.get("group", []):
            for element in group.get("element", []):
                for target in [t for t in element.get("target", []) if t.get("code")][:1]:
                    targets[element["code"]] = CodedConcept(
                        group["target"], target["code"], target.get("display", target["code"])
                    )
        maps[resource["url"]] = targets
    return maps


def label_concepts(manifest: ModelManifest) -> dict[str, CodedConcept]:
    """Every output label of the model and its code; raises UnmappedLabel for a missing one."""
    mapping = _concept_maps().get(manifest.label_concept_map)
    if mapping is None:
        raise UnmappedLabel(f"ConceptMap {manifest.label_concept_map} is not in mappings/")
    missing = [label for label in manifest.output.labels if label not in mapping]
    if missing:
        raise UnmappedLabel(f"labels {missing} of model {manifest.id} have no code")
    return {label: mapping[label] for label in manifest.output.labels}
