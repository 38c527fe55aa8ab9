"""The study-level decision rule (fhir_facade/analyze/decision.py) on hand-made slice outputs."""

from __future__ import annotations

import pytest

from fhir_facade.analyze.decision import decide, top_k
from fhir_facade.analyze.result import CodedConcept, ScoredInstance

LABELS = ("glioma", "meningioma", "notumor", "pituitary")
CONCEPTS = {label: CodedConcept("http://snomed.info/sct", str(n), label) for n, label in enumerate(LABELS)}


def slices(*rows: tuple[float, float, float, float]) -> list[ScoredInstance]:
    return [
        ScoredInstance("1.2.3", f"1.2.3.{n}", "1.2.840.10008.5.1.4.1.1.4", n, row)
        for n, row in enumerate(rows)
    ]


NORMAL = (0.01, 0.01, 0.97, 0.01)


@pytest.mark.parametrize(
    ("count", "k"), [(1, 1), (8, 1), (10, 1), (11, 2), (20, 2), (24, 3), (50, 5), (500, 5)]
)
def test_top_k_is_ten_percent_between_one_and_five(count: int, k: int) -> None:
    assert top_k(count) == k


def test_a_lesion_on_a_few_slices_decides_the_study() -> None:
    rows = [NORMAL] * 18 + [(0.9, 0.05, 0.03, 0.02), (0.8, 0.1, 0.05, 0.05)]
    decision = decide(slices(*rows), LABELS, "notumor", CONCEPTS)
    assert decision.label == "glioma"
    assert decision.probability == pytest.approx(0.85)  # mean of the top 2 of 20
    assert decision.concept == CONCEPTS["glioma"]
    assert {s.sop_instance_uid for s in decision.supporting} == {"1.2.3.18", "1.2.3.19"}


def test_one_noisy_slice_among_many_does_not() -> None:
    rows = [NORMAL] * 19 + [(0.9, 0.05, 0.03, 0.02)]
    decision = decide(slices(*rows), LABELS, "notumor", CONCEPTS)
    assert decision.label == "notumor"
    assert decision.probability == pytest.approx(1 - (0.9 + 0.01) / 2)
    assert len(decision.supporting) == 2


def test_below_threshold_everywhere_is_the_negative_label() -> None:
    decision = decide(slices(*[NORMAL] * 5), LABELS, "notumor", CONCEPTS)
    assert decision.label == "notumor"
    # 1 - the best tumour score (0.01), the same number as the finding's probability.
    assert decision.class_scores["notumor"] == pytest.approx(0.99) == decision.probability
    assert set(decision.class_concepts) == set(LABELS)


def test_the_negative_score_is_the_complement_of_the_finding_not_the_most_normal_slices() -> None:
    """A meningioma on 2 of 20 slices: the 18 normal slices output 0.97 "notumor", whose top-k
    mean would put "notumor 0.97" next to the meningioma finding; the reported score is
    1 - the meningioma score instead, and the decision says how it was derived."""
    rows = [NORMAL] * 18 + [(0.02, 0.9, 0.05, 0.03), (0.02, 0.8, 0.15, 0.03)]
    decision = decide(slices(*rows), LABELS, "notumor", CONCEPTS)
    assert decision.label == "meningioma"
    assert decision.class_scores["meningioma"] == pytest.approx(0.85)
    assert decision.class_scores["notumor"] == pytest.approx(0.15)
    assert decision.class_scores["glioma"] == pytest.approx(0.02)  # the others: top-k means
    note = decision.derived_scores["notumor"]
    assert "1 - the highest tumour class score (meningioma 0.8500)" in note
    assert "(0.9700)" in note
    assert set(decision.derived_scores) == {"notumor"}


def test_without_a_negative_label_the_best_class_wins_whatever_its_score() -> None:
    decision = decide(slices((0.3, 0.2, 0.25, 0.25)), LABELS, None, CONCEPTS)
    assert decision.label == "glioma"
    assert decision.probability == pytest.approx(0.3)
    assert decision.class_scores["notumor"] == pytest.approx(0.25)  # no negative label: as output
    assert decision.derived_scores == {}


def test_outputs_must_match_the_labels() -> None:
    with pytest.raises(ValueError, match="labels"):
        decide(slices(NORMAL), LABELS[:3], "notumor", CONCEPTS)
    with pytest.raises(ValueError, match="no scored"):
        decide([], LABELS, "notumor", CONCEPTS)
