"""After commit: a signed radiologist report goes to the PACS as an Encapsulated PDF (ADR 0033).

Each signed version a person writes (final, then amended or corrected) becomes a new instance in a
new series of the study (fhir_facade.reading.encapsulated_pdf): a PACS keeps what was reported, as
for the AI's SRs (ADR 0031). A PACS failure is logged and does not undo the committed report.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

from pydicom.dataset import Dataset

from fhir_facade.dicomweb.client import DicomwebClient
from fhir_facade.dicomweb.stow import StowClient
from fhir_facade.fhir.pipeline.events import ResourceChanged
from fhir_facade.reading.encapsulated_pdf import (
    STUDY_FIELDS,
    build_encapsulated_pdf,
    next_report_series_number,
)
from fhir_facade.reading.stage import SIGNED
from fhir_facade.reading.worklist import is_ai_report, study_uid_of

__all__ = ["ReportToPacs"]

log = logging.getLogger(__name__)


def _pdf(report: dict[str, Any]) -> bytes | None:
    for form in report.get("presentedForm", []):
        if form.get("contentType") == "application/pdf" and form.get("data"):  # the first PDF
            return base64.b64decode(form["data"])
    return None


class ReportToPacs:
    """The after-commit subscriber; `qido` finds the study, `stow` stores the document."""

    def __init__(self, qido: DicomwebClient, stow: StowClient) -> None:
        self._qido = qido
        self._stow = stow

    async def __call__(self, event: ResourceChanged) -> None:
        report = event.after
        if event.resource_type != "DiagnosticReport" or report is None or is_ai_report(event):
            return
        if report.get("status") not in SIGNED:
            return
        study_uid, pdf = study_uid_of(report), _pdf(report)
        if study_uid is None or pdf is None:
            return
        studies = await self._qido.search_studies(
            {"StudyInstanceUID": study_uid}, include_fields=STUDY_FIELDS
        )
        if not studies:
            log.warning(
                "DiagnosticReport/%s: study %s is not in the PACS; no PDF stored", report["id"], study_uid
            )
            return
        study = Dataset.from_json(studies[0])
        series = await self._qido.search_series({"StudyInstanceUID": study_uid}, include_fields=("00200011",))
        title = (report.get("code") or {}).get("text") or "Radiology report"
        dataset = await asyncio.to_thread(
            build_encapsulated_pdf,
            study,
            pdf,
            title=f"{title} ({report['status']})",
            series_number=next_report_series_number(series),
        )
        await self._stow.store([dataset], study_uid=study_uid)
        log.info(
            "DiagnosticReport/%s (%s) stored in the PACS as Encapsulated PDF %s",
            report["id"],
            report["status"],
            dataset.SOPInstanceUID,
        )
