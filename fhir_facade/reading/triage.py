"""The priority of a read, from the AI result (ADR 0033). Pure: the rules and the finding in, a
priority and an optional note out.

R4 Task.priority is bound to request-priority (routine | urgent | asap | stat, in rising order).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["LOW_CONFIDENCE_NOTE", "NO_AI_NOTE", "Triage", "TriageRules", "ai_finding", "triage"]

LOW_CONFIDENCE_NOTE = "review: low AI confidence"
NO_AI_NOTE = "no AI result yet"


@dataclass(frozen=True)
class TriageRules:
    """From the `reading` Settings section; codes are `system|code`."""

    urgent_threshold: float
    low_confidence: float
    critical_codes: frozenset[str]
    negative_codes: frozenset[str]


@dataclass(frozen=True)
class Triage:
    priority: str
    note: str | None = None


def _codes(concept: dict[str, Any] | None) -> set[str]:
    return {f"{c.get('system')}|{c.get('code')}" for c in (concept or {}).get("coding", [])}


def ai_finding(report: dict[str, Any], finding: dict[str, Any] | None) -> tuple[set[str], float | None]:
    """The AI report's finding codes (conclusionCode) and its score: the finding Observation's
    component scored for the concluded class (fhir_facade.analyze.fhir_report), None without one."""
    codes: set[str] = set()
    for concept in report.get("conclusionCode", []):
        codes |= _codes(concept)
    score = None
    for component in (finding or {}).get("component", []):
        if _codes(component.get("code")) & codes and "valueQuantity" in component:
            score = float(component["valueQuantity"]["value"])
            break
    return codes, score


def triage(rules: TriageRules, codes: Iterable[str] | None, score: float | None) -> Triage:
    """The reading priority. `codes` None means no AI result (routine). First matching rule wins:
    critical finding -> stat; negative finding -> routine; score under the low-confidence bound ->
    routine with a review note; positive finding at or over the urgent threshold -> urgent."""
    if codes is None:
        return Triage("routine", NO_AI_NOTE)
    found = set(codes)
    if found & rules.critical_codes:
        return Triage("stat")
    if found & rules.negative_codes:
        if score is not None and score < rules.low_confidence:
            return Triage("routine", LOW_CONFIDENCE_NOTE)
        return Triage("routine")
    if score is None or score < rules.low_confidence:
        return Triage("routine", LOW_CONFIDENCE_NOTE)
    if score >= rules.urgent_threshold:
        return Triage("urgent")
    return Triage("routine")
