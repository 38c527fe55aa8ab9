"""What an analysis produced, independent of FHIR and DICOM: the hand-off between the pixel and
inference pipeline and the writers (FHIR resources, DICOM SR).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fhir_facade.dicom_to_fhir.coding_schemes import coding_scheme_designator

__all__ = [
    "PRIVATE_CODING_SCHEME",
    "AnalysisResult",
    "CodedConcept",
    "ExcludedInstance",
    "PreviousSr",
    "ScoredInstance",
    "StudyDecision",
]

#: A local designator for codes of systems DICOM registers none for (PS3.16 8.2: "99" prefix).
PRIVATE_CODING_SCHEME = "99FHIRFACADE"


@dataclass(frozen=True)
class CodedConcept:
    """A code from a real terminology (SNOMED CT, LOINC, DCM): FHIR Coding and DICOM code alike."""

    system: str
    code: str
    display: str

    @property
    def dicom_scheme(self) -> str:
        """The DICOM Coding Scheme Designator for `system` (PS3.16 Section 8); a system with no
        registered designator gets our private one ("99" prefix, PS3.16 8.2)."""
        return coding_scheme_designator(self.system) or PRIVATE_CODING_SCHEME


@dataclass(frozen=True)
class ScoredInstance:
    """One image the model saw, and the model's output for it (in the manifest's label order)."""

    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None
    probabilities: tuple[float, ...]


@dataclass(frozen=True)
class ExcludedInstance:
    """An image left out of the study-level decision, and why (fhir_facade.analyze.applicability)."""

    instance: ScoredInstance
    reason: CodedConcept
    detail: str
    """What was measured, in words (e.g. "tissue area 41 % of the largest section")."""


@dataclass(frozen=True)
class PreviousSr:
    """An SR in the PACS that a new result's SR names in its Predecessor Documents Sequence."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class StudyDecision:
    """The study-level answer derived from the per-image outputs (fhir_facade.analyze.decision)."""

    label: str
    concept: CodedConcept
    probability: float
    class_scores: dict[str, float]
    class_concepts: dict[str, CodedConcept]
    method: str
    supporting: tuple[ScoredInstance, ...] = ()
    """The images whose outputs carried the decision: the top-k slices of the best tumour class."""
    derived_scores: dict[str, str] = field(default_factory=dict)
    """Class label -> how its score was derived when it is not the top-k mean of the model's output
    for that class (the negative class: 1 - the best positive score; fhir_facade.analyze.decision)."""
    assessed: bool = True
    """False when every image was excluded: `concept` is then "Undetermined", with no scores."""


@dataclass(frozen=True)
class AnalysisResult:
    """Everything the writers need: the study, the model, the per-image outputs and the decision."""

    study_uid: str
    model_id: str
    model_version: str
    model_title: str
    model_sha256: str
    labels: tuple[str, ...]
    instances: tuple[ScoredInstance, ...]
    decision: StudyDecision
    inference_seconds: float = 0.0
    providers: tuple[str, ...] = field(default_factory=tuple)
    excluded: tuple[ExcludedInstance, ...] = ()
    """Images the model ran on whose output the decision left out (ADR 0031); `instances` holds
    every image the model saw, the excluded ones included."""

    @property
    def assessed_instances(self) -> tuple[ScoredInstance, ...]:
        """The images the decision rests on: `instances` less the excluded ones."""
        left_out = {item.instance.sop_instance_uid for item in self.excluded}
        return tuple(i for i in self.instances if i.sop_instance_uid not in left_out)
