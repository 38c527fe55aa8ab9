"""The PACS side's typed errors; the FHIR layer maps them to OperationOutcomes."""

from __future__ import annotations

__all__ = ["DicomwebError", "DicomwebUnavailable"]


class DicomwebError(Exception):
    """The PACS answered, but not with a usable result (4xx, malformed JSON)."""


class DicomwebUnavailable(DicomwebError):
    """The PACS is unreachable, timed out, or failed (5xx): worth retrying later."""
