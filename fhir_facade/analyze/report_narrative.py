"""What the resources of an analysis say to a person (their R4 `text`, narrative.html).

The DiagnosticReport's narrative reads like a radiology report: title, patient and study, Findings
(the predicted class with its score, the scores of every class), Impression, and, before anything
else, that it is a preliminary AI result no radiologist has verified (R4 diagnosticreport.html:
"preliminary: verified early results are available, but not all results are final"; here nothing
is verified). The Observation, Device and Provenance say in a line or a table what they hold.
The markup and its escaping are fhir_facade.fhir.narrative's; this module only picks the facts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fhir_facade.fhir.narrative import (
    Facts,
    Heading,
    Paragraph,
    Table,
    joined,
    narrative,
    reference_text,
)

if TYPE_CHECKING:
    from fhir_facade.analyze.fhir_report import AnalysisContext
    from fhir_facade.analyze.result import AnalysisResult, ExcludedInstance

__all__ = [
    "PRELIMINARY_NOTICE",
    "device_narrative",
    "exclusion_narrative",
    "observation_narrative",
    "provenance_narrative",
    "report_narrative",
]

#: The caveat every AI report and finding leads with.
PRELIMINARY_NOTICE = (
    "Preliminary AI result: produced by an AI model and not verified by a radiologist. "
    "It must be reviewed by a physician before any clinical use."
)


def _model(result: AnalysisResult) -> str:
    return f"{result.model_title} ({result.model_id}, version {result.model_version})"


def _scores(result: AnalysisResult) -> Table:
    """Every class the model knows, highest score first, the predicted one marked."""
    decision = result.decision
    ranked = sorted(decision.class_scores.items(), key=lambda item: -item[1])
    return Table(
        ("Class", "Code", "Score", ""),
        [
            (
                decision.class_concepts[label].display,
                f"{decision.class_concepts[label].code} ({label})",
                f"{score:.4f}",
                "predicted" if label == decision.label else "",
            )
            for label, score in ranked
        ],
    )


def _study_facts(context: AnalysisContext) -> Facts:
    return Facts(
        [
            ("Patient", reference_text(context.subject)),
            ("Study", context.study_description),
            ("Study date", context.started),
            ("Accession number", context.accession_number),
            ("Imaging study", context.study_reference),
            ("Order", joined(reference_text(ref) for ref in context.based_on)),
        ]
    )


def report_narrative(result: AnalysisResult, context: AnalysisContext, conclusion: str) -> dict[str, str]:
    """The preliminary DiagnosticReport's narrative: a short radiology report."""
    decision = result.decision
    others = [
        f"{decision.class_concepts[label].display} {score:.2f}"
        for label, score in sorted(decision.class_scores.items(), key=lambda item: -item[1])
        if label != decision.label
    ]
    slices = len(result.assessed_instances)
    findings = (
        Paragraph(
            f"Predicted class: {decision.concept.display} (code {decision.concept.code}), "
            f"score {decision.probability:.2f}, over {slices} image{'s' if slices != 1 else ''}. "
            f"Other class scores: {', '.join(others) or 'none'}."
        )
        if decision.assessed
        else Paragraph(
            f"Not assessed: none of the {len(result.instances)} images is within the model's "
            "applicability, so the model makes no statement about this study."
        )
    )
    return narrative(
        Heading(f"AI imaging report (preliminary): {result.model_title}", 2),
        Paragraph(PRELIMINARY_NOTICE, strong=True),
        _study_facts(context),
        Heading("Findings"),
        findings,
        _scores(result),
        *_excluded_parts(result),
        Heading("Impression"),
        Paragraph(conclusion),
        Facts(
            [
                ("Status", "preliminary (not verified)"),
                ("Issued", context.issued),
                ("Model", _model(result)),
                ("Method", decision.method),
                ("DICOM SR in the PACS", context.sr.retrieve_url if context.sr else None),
            ]
        ),
    )


def _excluded_parts(result: AnalysisResult) -> list[Heading | Paragraph | Table]:
    """The images the applicability step left out of the decision, one row each (ADR 0031)."""
    if not result.excluded:
        return []
    return [
        Heading("Images not assessed"),
        Paragraph(
            f"{len(result.excluded)} of {len(result.instances)} images are outside what the model can "
            "assess; their outputs were not used."
        ),
        Table(
            ("Instance", "SOP Instance UID", "Reason", "Measured"),
            [
                (
                    item.instance.instance_number if item.instance.instance_number is not None else "",
                    item.instance.sop_instance_uid,
                    item.reason.display,
                    item.detail,
                )
                for item in result.excluded
            ],
        ),
    ]


def exclusion_narrative(excluded: ExcludedInstance, context: AnalysisContext) -> dict[str, str]:
    """An excluded image's Observation: which image, why it was left out."""
    instance = excluded.instance
    return narrative(
        Paragraph(
            f"Image not assessed by the AI model: {excluded.reason.display.lower()} ({excluded.detail}). "
            "Its output was left out of the study's result."
        ),
        Facts(
            [
                ("Instance number", instance.instance_number),
                ("SOP Instance UID", instance.sop_instance_uid),
                ("Series Instance UID", instance.series_uid),
                ("Imaging study", context.study_reference),
            ]
        ),
    )


def observation_narrative(result: AnalysisResult, context: AnalysisContext) -> dict[str, str]:
    """The finding Observation's narrative: what was measured and its value."""
    decision = result.decision
    return narrative(
        Heading("AI finding (preliminary)"),
        Paragraph(
            f"Finding: {decision.concept.display} (score {decision.probability:.2f}), "
            "by an AI model, not verified by a radiologist."
            if decision.assessed
            else f"Finding: {decision.concept.display}: no image of the study is within the model's "
            "applicability, so the model makes no statement about it.",
        ),
        Facts(
            [
                ("Measured", "Finding (DCM 121071), per-class scores (0-1)"),
                ("Value", f"{decision.concept.display} ({decision.concept.code})"),
                ("Patient", reference_text(context.subject)),
                ("Imaging study", context.study_reference),
                ("Model", _model(result)),
                ("Images supporting the finding", len(decision.supporting) or None),
            ]
        ),
        _scores(result),
    )


def device_narrative(device: dict[str, Any]) -> dict[str, str]:
    """The algorithm Device: which model, which version, which file."""
    names = [n.get("name") for n in device.get("deviceName", [])]
    return narrative(
        Paragraph(f"AI algorithm {names[0] if names else device.get('id')}, run by fhir-facade $analyze."),
        Facts(
            [
                ("Model", device.get("modelNumber")),
                ("Version", joined(v.get("value") for v in device.get("version", []))),
                ("ONNX sha256", joined(i.get("value") for i in device.get("identifier", []))),
                ("Status", device.get("status")),
            ]
        ),
    )


def provenance_narrative(provenance: dict[str, Any]) -> dict[str, str]:
    """The Provenance: what the algorithm created, from which study, when."""
    targets = joined(t.get("reference") for t in provenance.get("target", []))
    agents = joined(reference_text(a.get("who")) for a in provenance.get("agent", []))
    entities = provenance.get("entity", [])
    sources = joined(reference_text(e.get("what")) for e in entities if e.get("role") != "revision")
    revised = joined(reference_text(e.get("what")) for e in entities if e.get("role") == "revision")
    return narrative(
        Paragraph(
            f"{targets} created by the AI algorithm {agents} from {sources} at {provenance.get('recorded')}."
        ),
        Paragraph(f"This result supersedes {revised}.") if revised else None,
    )
