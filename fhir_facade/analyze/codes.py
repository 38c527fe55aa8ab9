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
    "ANALYSIS_APPLICABILITY",
    "ANALYZE_CODE",
    "DCM",
    "FINDING",
    "IMAGING_CATEGORY",
    "IMAGING_REPORT",
    "LOINC",
    "RADIOLOGY_SECTION",
    "SNOMED",
    "TASK_CODE_SYSTEM",
    "UNDETERMINED",
    "UnmappedLabel",
    "applicability_concept",
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


#: SNOMED CT 373068000 "Undetermined (qualifier value)": the finding of a study none of whose images
#: the model could assess (ADR 0031), so the report says "could not be assessed", never "no tumour".
UNDETERMINED = CodedConcept(SNOMED, "373068000", "Undetermined")
#: The facade's code system of slice applicability (mappings/CodeSystem-analysis-applicability.json).
ANALYSIS_APPLICABILITY = "http://fhir-facade.org/fhir/CodeSystem/analysis-applicability"


@cache
def _applicability_concepts() -> dict[str, CodedConcept]:
    path = data_path("mappings") / "CodeSystem-analysis-applicability.json"
    resource = json.loads(path.read_text(encoding="utf-8"))
    return {c["code"]: CodedConcept(resource["url"], c["code"], c["display"]) for c in resource["concept"]}


def applicability_concept(code: str) -> CodedConcept:
    """A concept of the slice applicability code system, by code (KeyError for an unknown one)."""
    return _applicability_concepts()[code]


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
