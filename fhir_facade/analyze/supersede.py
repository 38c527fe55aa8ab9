"""A new analysis of a study supersedes the current result of the same model (ADR 0031).

What "current" means: a DiagnosticReport still `preliminary` whose finding Observation (code DCM
121071) is part of the same ImagingStudy and was made by the same algorithm Device (one Device
per model version and file, `fhir_report.device_id`). A new run of the same model replaces it:

- FHIR R4 has no `replaces` element or extension for DiagnosticReport (the core `replaces`
  extension is only for definitional resources), so the link is the new result's Provenance:
  an entity with role `revision` ("A derivation for which the resulting entity is a revised
  version of some original", R4 provenance-entity-role) pointing at the old report;
- the old report and its Observations become `cancelled`: R4 diagnostic-report-status says a
  withdrawn report on which real-world decisions may have been made is `cancelled`, not
  `entered-in-error` ("This electronic record should never have existed"), and a preliminary AI
  result may have been seen. Their narrative says which report superseded them;
- the new SR names the old SRs in its Predecessor Documents Sequence (0040,A360), DICOM PS3.3
  C.17.2: SR documents are never changed in place; a new one references the ones it revises. The
  old SR series stay in the PACS: they are the record of what was reported, and the cancelled
  reports' presentedForm links keep working.

Everything is read and written as the server's own work: the caller asked for an analysis, and
superseding the study's earlier result is part of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fhir_facade.analyze.codes import DCM, FINDING
from fhir_facade.analyze.fhir_report import device_id
from fhir_facade.analyze.result import AnalysisResult, PreviousSr
from fhir_facade.auth.access import on_server_authority
from fhir_facade.dicom_to_fhir.uids import uid_from_identifier
from fhir_facade.fhir.internal_search import SearchBuilder
from fhir_facade.fhir.narrative import Paragraph, is_facade_narrative
from fhir_facade.fhir.pipeline import Origin, origin_scope
from fhir_facade.fhir.provider import ResourceProvider

__all__ = ["PreviousResult", "PreviousSr", "current_results", "superseded"]

#: At most this many current results are superseded at once (normally there is one).
_MAX_CURRENT = 20
#: Observations read per search (the server's page size limit is higher).
_CHUNK = 100


@dataclass(frozen=True)
class PreviousResult:
    """A current result of the study by the same model: its report, Observations and SR."""

    report_id: str
    report: dict[str, Any]
    observations: tuple[dict[str, Any], ...]
    sr: PreviousSr | None


async def current_results(
    writers: Mapping[str, ResourceProvider], study_id: str, result: AnalysisResult
) -> list[PreviousResult]:
    """The study's current results by the model of `result`, oldest first."""
    with on_server_authority(), origin_scope(Origin.INTERNAL):
        findings = (
            await SearchBuilder(writers["Observation"])
            .where("part-of", f"ImagingStudy/{study_id}")
            .where_token("code", DCM, FINDING.code)
            .where("device", f"Device/{device_id(result)}")
            .where("status", "preliminary")
            .count(_MAX_CURRENT)
            .matches()
        )
        if not findings:
            return []
        reports = (
            await SearchBuilder(writers["DiagnosticReport"])
            .where_any("result", [f"Observation/{o['id']}" for o in findings])
            .where("status", "preliminary")
            .sort("_lastUpdated")
            .count(_MAX_CURRENT)
            .matches()
        )
        previous = []
        for report in reports:
            ids = [
                ref.removeprefix("Observation/")
                for ref in (r.get("reference", "") for r in report.get("result", []))
                if ref.startswith("Observation/")
            ]
            observations: list[dict[str, Any]] = []
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                search = SearchBuilder(writers["Observation"]).where_any("_id", chunk).count(len(chunk))
                observations += await search.matches()
            previous.append(PreviousResult(report["id"], report, tuple(observations), _sr_of(report)))
    return previous


def superseded(previous: PreviousResult, by: str) -> list[dict[str, Any]]:
    """The old report and its Observations as they are written when `by` supersedes them."""
    notice = f"Superseded by {by}: a later analysis of the same study by the same model replaced this result."
    return [_cancelled(resource, notice) for resource in (*previous.observations, previous.report)]


def _cancelled(resource: dict[str, Any], notice: str) -> dict[str, Any]:
    updated = {key: value for key, value in resource.items() if key != "meta"}
    updated["status"] = "cancelled"
    text = updated.get("text")
    if isinstance(text, dict) and is_facade_narrative(text):
        div = str(text["div"])
        split = div.index(">") + 1
        updated["text"] = {**text, "div": div[:split] + Paragraph(notice, strong=True).html() + div[split:]}
    return updated


def _sr_of(report: Mapping[str, Any]) -> PreviousSr | None:
    """The SR a report was presented as: SOP Instance UID from its identifier, study and series
    from its WADO-RS presentedForm URL (.../studies/{s}/series/{r}/instances/{i})."""
    sop_uid = next((uid for uid in map(uid_from_identifier, report.get("identifier", [])) if uid), None)
    for form in report.get("presentedForm", []):
        parts = str(form.get("url", "")).split("/")
        try:
            study = parts[parts.index("studies") + 1]
            series = parts[parts.index("series") + 1]
            instance = parts[parts.index("instances") + 1]
        except (ValueError, IndexError):
            continue
        if sop_uid is None or instance == sop_uid:
            return PreviousSr(study, series, instance)
    return None
