"""The radiologist's report as a PDF (DiagnosticReport.presentedForm), made with fpdf2.

Pure: a DiagnosticReport (its sections as contained Observations, ADR 0033) in, PDF bytes out.
fpdf2's core fonts are Latin-1, so other characters are replaced; the structured report stays
the record, the PDF is its printable form.
"""

from __future__ import annotations

from typing import Any

from fpdf import FPDF

from fhir_facade.reading.codes import SECTIONS

__all__ = ["interpreter_names", "render_report_pdf", "report_sections"]

_SECTION_TITLES = dict(SECTIONS)


def _latin1(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1")


def _line(pdf: FPDF, height: int, text: str) -> None:
    pdf.multi_cell(0, height, text, new_x="LMARGIN", new_y="NEXT")


def interpreter_names(report: dict[str, Any]) -> list[str]:
    """Who signed: each resultsInterpreter's display, or its reference."""
    return [
        str(item.get("display") or item.get("reference") or "")
        for item in report.get("resultsInterpreter", [])
    ]


def report_sections(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, text) of each section, in the report's result order: the contained Observations
    `result` points to (`#id`) with a section LOINC code, their valueString."""
    contained = {
        r.get("id"): r for r in report.get("contained", []) if r.get("resourceType") == "Observation"
    }
    sections: list[tuple[str, str]] = []
    for item in report.get("result", []):
        reference = str(item.get("reference", ""))
        observation = contained.get(reference[1:]) if reference.startswith("#") else None
        if observation is None or "valueString" not in observation:
            continue
        codes = [c.get("code") for c in observation.get("code", {}).get("coding", [])]
        title = next((_SECTION_TITLES[c] for c in codes if c in _SECTION_TITLES), None)
        title = title or observation.get("code", {}).get("text") or "Section"
        sections.append((title, str(observation["valueString"])))
    return sections


def render_report_pdf(report: dict[str, Any], *, patient: str | None, study: str | None) -> bytes:
    """The report as a one-column A4 PDF: heading, status, patient and study, the sections, the
    conclusion, the signing interpreter(s)."""
    pdf = FPDF(format="A4")
    pdf.set_title(_latin1(report.get("code", {}).get("text") or "Imaging report"))
    pdf.set_creator("fhir-facade")
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 16)
    _line(pdf, 9, _latin1(report.get("code", {}).get("text") or "Imaging report"))
    pdf.set_font("Helvetica", "", 10)
    lines = [f"Status: {report.get('status', '')}"]
    if patient:
        lines.append(f"Patient: {patient}")
    if study:
        lines.append(f"Study: {study}")
    if report.get("issued"):
        lines.append(f"Issued: {report['issued']}")
    for line in lines:
        _line(pdf, 6, _latin1(line))
    for title, text in report_sections(report):
        pdf.ln(3)
        pdf.set_font("Helvetica", "B", 12)
        _line(pdf, 7, _latin1(title))
        pdf.set_font("Helvetica", "", 11)
        _line(pdf, 6, _latin1(text))
    if report.get("conclusion"):
        pdf.ln(3)
        pdf.set_font("Helvetica", "B", 12)
        _line(pdf, 7, "Conclusion")
        pdf.set_font("Helvetica", "", 11)
        _line(pdf, 6, _latin1(str(report["conclusion"])))
    names = interpreter_names(report)
    if names:
        pdf.ln(5)
        pdf.set_font("Helvetica", "I", 11)
        _line(pdf, 6, _latin1("Reported by: " + "; ".join(names)))
    return bytes(pdf.output())
