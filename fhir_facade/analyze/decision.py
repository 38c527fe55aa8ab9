"""The study-level decision from per-slice outputs of a slice classifier.

Method ("top-k mean", documented in docs/adr/0006-analyze.md): for each positive class c, the
study score s_c is the mean of the k highest per-slice probabilities of c, with k = ceil(10 % of
the slices), at least 1 and at most 5. A lesion is visible on a few slices only, so averaging over
the whole series would drown it, while the single highest slice (k = 1) lets one noisy slice
decide; the mean of the top few needs agreement between neighbouring slices. The study is
positive for the class with the highest s_c when that score reaches `threshold` (0.5), else it is
the negative label with score 1 - max s_c.

The negative class's reported score is that same 1 - max s_c, whatever the finding, not a top-k
mean of the model's own negative output. The model ends in a softmax over all four classes, so
every slice's "no tumour" output is 1 minus its tumour outputs; but the top-k rule picks a class's
*highest* slices, and for "no tumour" those are the most normal slices, which every study with a
focal lesion also has (the demo study: 1.00 next to a meningioma finding). "The study shows no
tumour" is the complement of "its most suspicious slices show one", so the negative score is
derived from the positive ones, and `StudyDecision.derived_scores` says so (Observation.note).

Limits: the scores are not calibrated probabilities of the study, and they do not sum to 1; the
classifier was trained on single 2D slices of tumour cases and controls, so slices outside the
brain (skull base, vertex) are out of its distribution; a study can only get one finding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fhir_facade.analyze.codes import UNDETERMINED
from fhir_facade.analyze.result import CodedConcept, ScoredInstance, StudyDecision

__all__ = ["DEFAULT_THRESHOLD", "decide", "not_assessed", "top_k"]

DEFAULT_THRESHOLD = 0.5
METHOD = "top-k mean of slice probabilities, k = ceil(10% of slices) in [1, 5], threshold {threshold}"


def top_k(slice_count: int) -> int:
    """How many of the highest-scoring slices carry a class's study score."""
    return max(1, min(5, math.ceil(0.1 * slice_count)))


def decide(
    instances: Sequence[ScoredInstance],
    labels: Sequence[str],
    negative_label: str | None,
    concepts: Mapping[str, CodedConcept],
    *,
    threshold: float = DEFAULT_THRESHOLD,
) -> StudyDecision:
    """Reduce per-slice probabilities (in `labels` order) to one study-level finding."""
    if not instances:
        raise ValueError("no scored instances to decide on")
    probabilities = np.asarray([i.probabilities for i in instances], dtype=np.float64)
    if probabilities.shape[1] != len(labels):
        raise ValueError(f"{probabilities.shape[1]} outputs per slice, {len(labels)} labels")
    k = top_k(len(instances))
    top_indices: dict[str, np.ndarray] = {}
    scores: dict[str, float] = {}
    for column, label in enumerate(labels):
        order = np.argsort(-probabilities[:, column], kind="stable")[:k]
        top_indices[label] = order
        scores[label] = float(probabilities[order, column].mean())

    positives = [label for label in labels if label != negative_label]
    best = max(positives, key=lambda label: scores[label])
    derived: dict[str, str] = {}
    if negative_label is not None:
        own = scores[negative_label]
        scores[negative_label] = 1.0 - scores[best]
        derived[negative_label] = (
            f"The {negative_label} score {scores[negative_label]:.4f} is 1 - the highest tumour class "
            f"score ({best} {scores[best]:.4f}): the study shows no tumour only if its most suspicious "
            f"slices do not. The model's own per-slice {negative_label} output, taken over its top-{k} "
            f"slices ({own:.4f}), would pick the most normal slices instead, which a study with a "
            "focal lesion has too."
        )
    # Either way the decision rests on the k slices of the best tumour class: they carried the
    # positive score, or came closest to one.
    supporting = tuple(instances[i] for i in top_indices[best])
    if negative_label is None or scores[best] >= threshold:
        label, probability = best, scores[best]
    else:
        label, probability = negative_label, 1.0 - scores[best]
    return StudyDecision(
        label=label,
        concept=concepts[label],
        probability=round(probability, 4),
        class_scores={name: round(score, 4) for name, score in scores.items()},
        class_concepts={name: concepts[name] for name in labels},
        method=METHOD.format(threshold=threshold),
        supporting=supporting,
        derived_scores=derived,
    )


def not_assessed(labels: Sequence[str], concepts: Mapping[str, CodedConcept], excluded: int) -> StudyDecision:
    """The decision when the applicability step left no image (ADR 0031): "Undetermined", no
    scores, so the report says the study could not be assessed, never "no tumour"."""
    return StudyDecision(
        label="not-assessed",
        concept=UNDETERMINED,
        probability=0.0,
        class_scores={},
        class_concepts={name: concepts[name] for name in labels},
        method=f"no decision: all {excluded} image(s) were outside the model's applicability",
        assessed=False,
    )
