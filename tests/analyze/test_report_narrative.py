"""The narratives of an analysis result (fhir_report.build_resources, report_narrative): built from a
decision of the real manifest's labels and codes, with hostile study and patient strings."""

from __future__ import annotations

from fhir_facade.analyze.codes import label_concepts
from fhir_facade.analyze.decision import decide
from fhir_facade.analyze.fhir_report import AnalysisContext, SrReference, build_resources
from fhir_facade.analyze.manifest import load_manifests
from fhir_facade.analyze.result import AnalysisResult, ScoredInstance
from tests.conftest import validate
from tests.narrative_checks import narrative_text

MANIFEST = load_manifests()["brain-tumor-vgg16"]
HOSTILE = "<script>alert(1)</script> Head & Neck"
PATIENT = "O'Brien & <b>Sons</b>"


def _result() -> AnalysisResult:
    labels = MANIFEST.output.labels  # glioma, meningioma, notumor, pituitary
    instances = tuple(
        ScoredInstance("1.2.3.1", f"1.2.3.1.{n}", "1.2.840.10008.5.1.4.1.1.4", n, (0.05, 0.9, 0.03, 0.02))
        for n in range(1, 5)
    )
    decision = decide(instances, labels, MANIFEST.output.negative_label, label_concepts(MANIFEST))
    return AnalysisResult(
        study_uid="1.2.3",
        model_id=MANIFEST.id,
        model_version=MANIFEST.version,
        model_title=MANIFEST.title,
        model_sha256=MANIFEST.sha256,
        labels=labels,
        instances=instances,
        decision=decision,
    )


def _context() -> AnalysisContext:
    return AnalysisContext(
        study_reference="ImagingStudy/1.2.3",
        subject={"reference": "Patient/P-1", "display": PATIENT},
        based_on=({"reference": "ServiceRequest/o1"},),
        started="2024-07-01T10:00:00+02:00",
        issued="2024-07-01T11:00:00.000Z",
        report_id="r1",
        observation_id="o1",
        provenance_id="p1",
        sr=SrReference("1.2.3.9.1", "1.2.3.9", "http://example.org/dicom-web/studies/1.2.3"),
        study_description=HOSTILE,
        accession_number="ACC-7",
    )


def test_every_resource_has_a_valid_narrative_with_escaped_values() -> None:
    resources = build_resources(_result(), _context())
    for resource in resources.all():
        validate(resource)
        assert "<script" not in resource["text"]["div"]
        narrative_text(resource)


def test_the_report_reads_like_a_preliminary_radiology_report() -> None:
    resources = build_resources(_result(), _context())
    meningioma = label_concepts(MANIFEST)["meningioma"].display
    content = narrative_text(
        resources.report,
        "AI imaging report (preliminary)",
        "not verified by a radiologist",
        f"Patient {PATIENT} (Patient/P-1)",
        f"Study {HOSTILE}",
        "Study date 2024-07-01T10:00:00+02:00",
        "Accession number ACC-7",
        "Findings",
        f"Predicted class: {meningioma}",
        "score 0.90",
        "Other class scores:",
        "Impression",
        resources.report["conclusion"],
        f"version {MANIFEST.version}",
        "ServiceRequest/o1",
    )
    assert content.index("Findings") < content.index("Impression")
    for concept in label_concepts(MANIFEST).values():
        assert concept.display in content  # every class score is listed


def test_the_observation_says_what_was_measured_and_its_value() -> None:
    resources = build_resources(_result(), _context())
    meningioma = label_concepts(MANIFEST)["meningioma"].display
    narrative_text(resources.observations[0], "Finding (DCM 121071)", f"Value {meningioma}", "preliminary")
    narrative_text(resources.device, MANIFEST.title, MANIFEST.sha256)
    narrative_text(resources.provenance, "DiagnosticReport/r1", "ImagingStudy/1.2.3")


def test_excluded_images_and_a_superseded_report_are_told() -> None:
    """ADR 0031: the report lists each excluded image (instance, UID, reason, measurement); each
    exclusion Observation says which image and why; the Provenance names the superseded report."""
    from dataclasses import replace

    from fhir_facade.analyze.codes import applicability_concept
    from fhir_facade.analyze.result import ExcludedInstance

    result = _result()
    excluded = ExcludedInstance(
        result.instances[0], applicability_concept("skull-base-level"), "at 12% of the head's extent"
    )
    resources = build_resources(
        replace(result, excluded=(excluded,)), replace(_context(), replaces=("DiagnosticReport/old",))
    )
    for resource in resources.all():
        validate(resource)
    narrative_text(
        resources.report,
        "Images not assessed",
        "1 of 4 images are outside what the model can assess",
        "1.2.3.1.1",
        "Section at skull-base level",
        "at 12% of the head's extent",
    )
    assert "over 3 slices; 1 of 4 slices outside the model's applicability" in resources.report["conclusion"]
    narrative_text(
        resources.observations[1], "Image not assessed by the AI model", "Instance number 1", "1.2.3.1.1"
    )
    narrative_text(resources.provenance, "This result supersedes DiagnosticReport/old")
    assert {"role": "revision", "what": {"reference": "DiagnosticReport/old"}} in resources.provenance[
        "entity"
    ]
