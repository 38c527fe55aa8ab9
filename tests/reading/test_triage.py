"""The triage rules of the reading worklist (fhir_facade/reading/triage.py, ADR 0033): pure."""

from __future__ import annotations

import pytest

from fhir_facade.reading.triage import (
    LOW_CONFIDENCE_NOTE,
    NO_AI_NOTE,
    Triage,
    TriageRules,
    ai_finding,
    triage,
)

SCT = "http://snomed.info/sct"
GLIOMA, MENINGIOMA, NORMAL = f"{SCT}|393564001", f"{SCT}|302820008", f"{SCT}|281900007"
RULES = TriageRules(
    urgent_threshold=0.8,
    low_confidence=0.6,
    critical_codes=frozenset({GLIOMA}),
    negative_codes=frozenset({NORMAL}),
)


@pytest.mark.parametrize(
    ("codes", "score", "expected"),
    [
        (None, None, Triage("routine", NO_AI_NOTE)),
        ({GLIOMA}, 0.3, Triage("stat")),  # a critical class is stat whatever its score
        ({MENINGIOMA}, 0.8, Triage("urgent")),  # positive at the threshold
        ({MENINGIOMA}, 0.95, Triage("urgent")),
        ({MENINGIOMA}, 0.7, Triage("routine")),  # positive, under the threshold
        ({MENINGIOMA}, 0.59, Triage("routine", LOW_CONFIDENCE_NOTE)),
        ({MENINGIOMA}, None, Triage("routine", LOW_CONFIDENCE_NOTE)),
        ({NORMAL}, 0.99, Triage("routine")),
        ({NORMAL}, 0.5, Triage("routine", LOW_CONFIDENCE_NOTE)),
    ],
)
def test_rules(codes: set[str] | None, score: float | None, expected: Triage) -> None:
    assert triage(RULES, codes, score) == expected


def test_the_score_is_the_component_of_the_concluded_class() -> None:
    report = {"conclusionCode": [{"coding": [{"system": SCT, "code": "302820008"}]}]}
    finding = {
        "component": [
            {"code": {"coding": [{"system": SCT, "code": "393564001"}]}, "valueQuantity": {"value": 0.1}},
            {"code": {"coding": [{"system": SCT, "code": "302820008"}]}, "valueQuantity": {"value": 0.85}},
        ]
    }
    assert ai_finding(report, finding) == ({MENINGIOMA}, 0.85)
    assert ai_finding(report, None) == ({MENINGIOMA}, None)
