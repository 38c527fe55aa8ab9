"""The codes of the reading workflow (ADR 0033): the `read` Task code and the LOINC codes of the
sections of a radiology report."""

from __future__ import annotations

from fhir_facade.analyze.codes import LOINC, TASK_CODE_SYSTEM

__all__ = [
    "AMENDMENT_REASON_EXTENSION",
    "PRIORITY_ORDER",
    "READ_CODE",
    "SECTIONS",
    "TASK_CODE_SYSTEM",
]

#: The facade's Task code (capability/CodeSystem-task-code.json) of a radiologist's read.
READ_CODE = {"system": TASK_CODE_SYSTEM, "code": "read", "display": "Read imaging study"}

#: R4 request-priority, lowest first (valueset-request-priority: routine, urgent, asap, stat).
PRIORITY_ORDER = ("routine", "urgent", "asap", "stat")

#: The sections of a radiology report, in reading order, by their LOINC codes: those of DICOM
#: PS3.16 TID 2000 "Basic Diagnostic Imaging Report" and of the HL7 imaging-report IG's
#: Composition sections (technique 55111-9, comparison 18834-2, findings 59776-5, impression
#: 19005-8).
SECTIONS: tuple[tuple[str, str], ...] = (
    ("55111-9", "Technique"),
    ("18834-2", "Comparison"),
    ("59776-5", "Findings"),
    ("19005-8", "Impression"),
)
SECTION_LOINC = LOINC

#: Why a signed report was amended or corrected. R4 DiagnosticReport has no `note` and no
#: `statusReason`; R5 added `DiagnosticReport.note`, which R4 reaches through the cross-version
#: extension (FHIR R5 "Extensions for representing elements from other versions").
AMENDMENT_REASON_EXTENSION = "http://hl7.org/fhir/5.0/StructureDefinition/extension-DiagnosticReport.note"
