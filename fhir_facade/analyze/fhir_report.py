"""An analysis result as FHIR R4 resources: algorithm Device, finding Observation(s),
DiagnosticReport and Provenance.

The shape follows the HL7 "DICOM SR to FHIR" IG's qualitative evaluation in R4 terms:
Observation.code "Finding" (DCM 121071), valueCodeableConcept the finding, partOf and derivedFrom
the ImagingStudy, device the algorithm, the per-class scores as components. R4 has no
ImagingSelection, so the images behind the finding are listed with the extension
`SOURCE_IMAGE_EXTENSION` (one valueIdentifier urn:oid:<SOP Instance UID> each; ADR 0006).
Everything is `preliminary`: no person has signed it.

Pure functions: ids are chosen by the caller so the resources can reference each other before
anything is stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fhir_facade.analyze.codes import FINDING, IMAGING_CATEGORY, IMAGING_REPORT, RADIOLOGY_SECTION
from fhir_facade.analyze.report_narrative import (
    device_narrative,
    observation_narrative,
    provenance_narrative,
    report_narrative,
)
from fhir_facade.analyze.result import AnalysisResult, CodedConcept, ScoredInstance
from fhir_facade.dicom_to_fhir.uids import uid_identifier
from fhir_facade.fhir.narrative import with_narrative

__all__ = [
    "MODEL_SHA256_SYSTEM",
    "SOURCE_IMAGE_EXTENSION",
    "AnalysisContext",
    "AnalysisResources",
    "SrReference",
    "build_resources",
    "device_id",
]

SOURCE_IMAGE_EXTENSION = "http://fhir-facade.org/fhir/StructureDefinition/source-image"
#: Identifier.system of a model's ONNX file digest (Device.identifier).
MODEL_SHA256_SYSTEM = "http://fhir-facade.org/fhir/sid/onnx-sha256"
_UCUM = "http://unitsofmeasure.org"


@dataclass(frozen=True)
class SrReference:
    """The DICOM SR written back to the PACS for this result."""

    sop_instance_uid: str
    series_uid: str
    retrieve_url: str


@dataclass(frozen=True)
class AnalysisContext:
    """What the result is about, from the live ImagingStudy and the request."""

    study_reference: str
    """`ImagingStudy/<id>`"""
    subject: dict[str, Any] | None
    """The ImagingStudy's subject Reference (Patient), as is."""
    based_on: tuple[dict[str, Any], ...]
    """The orders (ServiceRequest References) the study was made for."""
    started: str | None
    issued: str
    report_id: str
    observation_id: str
    provenance_id: str
    sr: SrReference | None = None
    study_description: str | None = None
    accession_number: str | None = None


@dataclass(frozen=True)
class AnalysisResources:
    device: dict[str, Any]
    observations: tuple[dict[str, Any], ...]
    report: dict[str, Any]
    provenance: dict[str, Any]

    def all(self) -> list[dict[str, Any]]:
        return [self.device, *self.observations, self.report, self.provenance]


def device_id(result: AnalysisResult) -> str:
    """One Device per model version and file: stable, so every report of the model shares it."""
    return f"{result.model_id}-{result.model_sha256[:12]}"[:64]


def _coding(concept: CodedConcept) -> dict[str, str]:
    return {"system": concept.system, "code": concept.code, "display": concept.display}


def _concept(concept: CodedConcept, text: str | None = None) -> dict[str, Any]:
    return {"coding": [_coding(concept)], "text": text or concept.display}


def _about(context: AnalysisContext) -> dict[str, Any]:
    """What the Observation and the DiagnosticReport share: the patient, the orders, the time."""
    about: dict[str, Any] = {}
    if context.subject:
        about["subject"] = context.subject
    if context.based_on:
        about["basedOn"] = list(context.based_on)
    if context.started:
        about["effectiveDateTime"] = context.started
    return about


def _device(result: AnalysisResult) -> dict[str, Any]:
    return {
        "resourceType": "Device",
        "id": device_id(result),
        "identifier": [{"system": MODEL_SHA256_SYSTEM, "value": result.model_sha256}],
        "status": "active",
        "deviceName": [
            {"name": result.model_title, "type": "user-friendly-name"},
            {"name": result.model_id, "type": "model-name"},
        ],
        "modelNumber": result.model_id,
        "version": [{"value": result.model_version}],
        "note": [{"text": "AI algorithm run by fhir-facade $analyze; ONNX sha256 in identifier."}],
    }


def _source_images(instances: tuple[ScoredInstance, ...]) -> list[dict[str, Any]]:
    return [
        {
            "url": SOURCE_IMAGE_EXTENSION,
            "valueIdentifier": uid_identifier(instance.sop_instance_uid),
        }
        for instance in instances
    ]


def _observation(result: AnalysisResult, context: AnalysisContext, device_ref: str) -> dict[str, Any]:
    decision = result.decision
    study = {"reference": context.study_reference}
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "id": context.observation_id,
        "extension": _source_images(decision.supporting),
        "status": "preliminary",
        "category": [{"coding": [IMAGING_CATEGORY]}],
        "code": _concept(FINDING),
        "partOf": [study],
        "derivedFrom": [study],
        "issued": context.issued,
        "device": {"reference": device_ref},
        "method": {"text": decision.method},
        "valueCodeableConcept": _concept(decision.concept),
        "component": [
            {
                "code": _concept(decision.class_concepts[label], f"Score for {label}"),
                "valueQuantity": {
                    "value": score,
                    "unit": "score",
                    "system": _UCUM,
                    "code": "1",
                },
            }
            for label, score in decision.class_scores.items()
        ],
    }
    if decision.derived_scores:  # a score that is not the model's output for its class says why
        observation["note"] = [{"text": text} for text in decision.derived_scores.values()]
    return {**observation, **_about(context)}


def conclusion_text(result: AnalysisResult) -> str:
    """The report's conclusion: the finding, its score, the evidence size and the caveat."""
    decision = result.decision
    slices = len(result.instances)
    model = f"{result.model_title} {result.model_version}"
    return (
        f"{decision.concept.display} (AI finding, score {decision.probability:.2f} over {slices} "
        f"slice{'s' if slices != 1 else ''}; model {model}). Preliminary: not reviewed by a physician."
    )


def _report(result: AnalysisResult, context: AnalysisContext, observation_refs: list[str]) -> dict[str, Any]:
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": context.report_id,
        "status": "preliminary",
        "category": [{"coding": [RADIOLOGY_SECTION]}],
        "code": _concept(IMAGING_REPORT, f"AI analysis: {result.model_title}"),
        "issued": context.issued,
        "imagingStudy": [{"reference": context.study_reference}],
        "result": [{"reference": ref} for ref in observation_refs],
        "conclusion": conclusion_text(result),
        "conclusionCode": [_concept(result.decision.concept)],
    }
    report.update(_about(context))
    if context.sr is not None:
        report["identifier"] = [uid_identifier(context.sr.sop_instance_uid)]
        report["presentedForm"] = [
            {
                "contentType": "application/dicom",
                "url": context.sr.retrieve_url,
                "title": "DICOM Comprehensive 3D SR (TID 1500) of this result, in the PACS",
            }
        ]
    return report


def _provenance(context: AnalysisContext, targets: list[str], device_ref: str) -> dict[str, Any]:
    return {
        "resourceType": "Provenance",
        "id": context.provenance_id,
        "target": [{"reference": ref} for ref in targets],
        "recorded": context.issued,
        "activity": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                    "code": "CREATE",
                    "display": "create",
                }
            ]
        },
        "agent": [
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                            "code": "author",
                            "display": "Author",
                        }
                    ]
                },
                "who": {"reference": device_ref},
            }
        ],
        "entity": [{"role": "source", "what": {"reference": context.study_reference}}],
    }


def build_resources(result: AnalysisResult, context: AnalysisContext) -> AnalysisResources:
    """The FHIR resources of one analysis, referencing each other by the context's ids, each with
    its generated narrative (report_narrative)."""
    device = _device(result)
    device = with_narrative(device, device_narrative(device))
    device_ref = f"Device/{device['id']}"
    observation = _observation(result, context, device_ref)
    observation = with_narrative(observation, observation_narrative(result, context))
    observation_ref = f"Observation/{observation['id']}"
    report = _report(result, context, [observation_ref])
    report = with_narrative(report, report_narrative(result, context, report["conclusion"]))
    report_ref = f"DiagnosticReport/{report['id']}"
    provenance = _provenance(context, [report_ref, observation_ref], device_ref)
    provenance = with_narrative(provenance, provenance_narrative(provenance))
    return AnalysisResources(device, (observation,), report, provenance)
