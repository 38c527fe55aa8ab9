"""The Series Number of a new AI result series (fhir_facade/analyze/sr_series_number.py), on QIDO JSON.
The real-PACS check (two analyses: 9901, then 9902) is in test_analyze_operation.py."""

from __future__ import annotations

from typing import Any

from fhir_facade.analyze.sr_series_number import next_series_number


def series(*numbers: Any) -> list[dict[str, Any]]:
    return [{"00200011": {"vr": "IS", "Value": [n]}} if n is not None else {} for n in numbers]


def test_the_first_result_is_9901() -> None:
    assert next_series_number([]) == 9901
    assert next_series_number(series(1, 2, 301, None)) == 9901  # the scanner's numbers do not count


def test_later_results_follow_the_highest_result_number() -> None:
    assert next_series_number(series(1, 9901)) == 9902
    assert next_series_number(series(9903, 9901, "9902")) == 9904  # IS may come as a string


def test_malformed_or_empty_values_are_ignored() -> None:
    assert next_series_number([{"00200011": {"vr": "IS"}}, *series("x", 9901)]) == 9902
