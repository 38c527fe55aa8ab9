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

import base64
from dataclasses import dataclass
from typing import Any

from fhir_facade.analyze.codes import (
    FINDING,
    IMAGING_CATEGORY,
    IMAGING_REPORT,
    RADIOLOGY_SECTION,
    applicability_concept,
)
from fhir_facade.analyze.report_narrative import (
    device_narrative,
    exclusion_narrative,
    observation_narrative,
    provenance_narrative,
    report_narrative,
)
from fhir_facade.analyze.result import AnalysisResult, CodedConcept, ExcludedInstance, ScoredInstance
from fhir_facade.dicom_to_fhir.uids import uid_identifier
from fhir_facade.fhir.narrative import with_narrative

__all__ = [
    "MODEL_SHA256_SYSTEM",
    "SOURCE_IMAGE_EXTENSION",
    "AnalysisContext",
    "AnalysisResources",
    "SaliencyReference",
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
class SaliencyReference:
    """The saliency map of the key image (ADR 0035): the Parametric Map in the PACS and its PNG
    rendering over the image."""

    sop_instance_uid: str
    retrieve_url: str
    key_sop_instance_uid: str
    key_instance_number: int | None
    concept: CodedConcept
    png: bytes
    method: str
    region_sop_instance_uid: str | None = None
    """The Segmentation of the map's most salient region (`saliency_seg`), when it has one."""
    region_retrieve_url: str | None = None
    region_rule: str = ""
    """How the region is cut from the map, for the Media's comment."""


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
    replaces: tuple[str, ...] = ()
    """`DiagnosticReport/<id>` of the current results this one supersedes (ADR 0031)."""
    saliency: SaliencyReference | None = None


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
    if not observation["extension"]:
        del observation["extension"]
    if not observation["component"]:
        del observation["component"]
    notes = list(decision.derived_scores.values())  # a score not the model's own for its class
    if result.excluded:
        notes.append(excluded_summary(result))
    if notes:
        observation["note"] = [{"text": text} for text in notes]
    return {**observation, **_about(context)}


def exclusion_id(context: AnalysisContext, index: int) -> str:
    """The id of the Observation recording the `index`-th excluded image (64 characters at most)."""
    return f"{context.observation_id}-x{index}"[:64]


def _exclusion(
    excluded: ExcludedInstance, observation_id: str, context: AnalysisContext, device_ref: str
) -> dict[str, Any]:
    """One image left out of the decision (ADR 0031), in the finding's shape: the image by the
    source-image extension, code "Image not assessed by the AI model", the reason as the value (a
    code and the measurement in words), the Instance Number as a component."""
    study = {"reference": context.study_reference}
    instance = excluded.instance
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "id": observation_id,
        "extension": _source_images((instance,)),
        "status": "preliminary",
        "category": [{"coding": [IMAGING_CATEGORY]}],
        "code": _concept(applicability_concept("not-assessed")),
        "partOf": [study],
        "derivedFrom": [study],
        "issued": context.issued,
        "device": {"reference": device_ref},
        "valueCodeableConcept": _concept(excluded.reason, f"{excluded.reason.display}: {excluded.detail}"),
    }
    if instance.instance_number is not None:
        observation["component"] = [
            {
                "code": _concept(applicability_concept("instance-number")),
                "valueInteger": instance.instance_number,
            }
        ]
    return {**observation, **_about(context)}


def excluded_summary(result: AnalysisResult) -> str:
    """How many images the applicability step left out, and why, in one sentence."""
    counts: dict[str, int] = {}
    for item in result.excluded:
        counts[item.reason.display] = counts.get(item.reason.display, 0) + 1
    reasons = "; ".join(f"{reason.lower()}: {count}" for reason, count in counts.items())
    total = len(result.instances)
    return (
        f"{len(result.excluded)} of {total} slice{'s' if total != 1 else ''} outside the model's "
        f"applicability, not used ({reasons})"
    )


def conclusion_text(result: AnalysisResult) -> str:
    """The report's conclusion: the finding, its score, the evidence size and the caveat; or, when
    no image could be assessed, that the study could not be assessed (never "no tumour")."""
    decision = result.decision
    model = f"{result.model_title} {result.model_version}"
    preliminary = "Preliminary: not reviewed by a physician."
    if not decision.assessed:
        return (
            f"The study could not be assessed by the AI model: {excluded_summary(result)}. "
            f"This is no statement that there is no tumour (model {model}). {preliminary}"
        )
    slices = len(result.assessed_instances)
    excluded = f"; {excluded_summary(result)}" if result.excluded else ""
    return (
        f"{decision.concept.display} (AI finding, score {decision.probability:.2f} over {slices} "
        f"slice{'s' if slices != 1 else ''}{excluded}; model {model}). {preliminary}"
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
    if context.saliency is not None:
        report["contained"], report["media"] = _saliency_media(context.saliency, context)
    return report


def _saliency_media(
    saliency: SaliencyReference, context: AnalysisContext
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The key image's saliency map as R4 DiagnosticReport.media ("key images associated with
    this report"), each a contained Media (the facade stores no Media of its own, ADR 0035): the
    PNG rendering for any client, the DICOM Parametric Map in the PACS (the values) and, when the
    map has a positive maximum, the DICOM Segmentation of its most salient region (what OHIF
    overlays, ADR 0044)."""
    number = saliency.key_instance_number
    image = f"image {number}" if number is not None else "the key image"
    comment = (
        f"Where the model found the evidence for {saliency.concept.display} on {image} "
        f"(urn:oid:{saliency.key_sop_instance_uid}): {saliency.method}. Preliminary."
    )
    base: dict[str, Any] = {
        "resourceType": "Media",
        "status": "completed",
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/media-type", "code": "image"}]},
        "identifier": [uid_identifier(saliency.sop_instance_uid)],
        "partOf": [{"reference": context.study_reference}],
        "issued": context.issued,
    }
    if context.subject:
        base["subject"] = context.subject
    rendered = {
        **base,
        "id": "saliency-png",
        "content": {
            "contentType": "image/png",
            "data": base64.b64encode(saliency.png).decode("ascii"),
            "title": f"Saliency map over {image}",
        },
    }
    dicom = {
        **base,
        "id": "saliency-dicom",
        "content": {
            "contentType": "application/dicom",
            "url": saliency.retrieve_url,
            "title": f"DICOM Parametric Map over {image}, in the PACS",
        },
    }
    media = [
        {"comment": comment, "link": {"reference": "#saliency-png"}},
        {"comment": comment, "link": {"reference": "#saliency-dicom"}},
    ]
    contained = [rendered, dicom]
    if saliency.region_sop_instance_uid is not None and saliency.region_retrieve_url is not None:
        contained.append(
            {
                **base,
                "id": "saliency-region",
                "identifier": [uid_identifier(saliency.region_sop_instance_uid)],
                "content": {
                    "contentType": "application/dicom",
                    "url": saliency.region_retrieve_url,
                    "title": f"DICOM Segmentation of the map's most salient region over {image}, in the PACS",
                },
            }
        )
        region_comment = f"{comment} Region: {saliency.region_rule}."
        media.append({"comment": region_comment, "link": {"reference": "#saliency-region"}})
    return contained, media


def _provenance(context: AnalysisContext, targets: list[str], device_ref: str) -> dict[str, Any]:
    """Who made the result from what; a superseded report is an entity with role `revision` (R4
    provenance-entity-role: "the resulting entity is a revised version of some original")."""
    revised = [{"role": "revision", "what": {"reference": ref}} for ref in context.replaces]
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
        "entity": [{"role": "source", "what": {"reference": context.study_reference}}, *revised],
    }


def build_resources(result: AnalysisResult, context: AnalysisContext) -> AnalysisResources:
    """The FHIR resources of one analysis, referencing each other by the context's ids, each with
    its generated narrative (report_narrative)."""
    device = _device(result)
    device = with_narrative(device, device_narrative(device))
    device_ref = f"Device/{device['id']}"
    observation = _observation(result, context, device_ref)
    observation = with_narrative(observation, observation_narrative(result, context))
    exclusions = [
        with_narrative(
            _exclusion(item, exclusion_id(context, index), context, device_ref),
            exclusion_narrative(item, context),
        )
        for index, item in enumerate(result.excluded, start=1)
    ]
    observation_refs = [f"Observation/{o['id']}" for o in (observation, *exclusions)]
    report = _report(result, context, observation_refs)
    report = with_narrative(report, report_narrative(result, context, report["conclusion"]))
    report_ref = f"DiagnosticReport/{report['id']}"
    provenance = _provenance(context, [report_ref, *observation_refs], device_ref)
    provenance = with_narrative(provenance, provenance_narrative(provenance))
    return AnalysisResources(device, (observation, *exclusions), report, provenance)
