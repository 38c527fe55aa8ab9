"""The reading workflow (ADR 0033): reading Tasks triaged by the AI result, claims, and the
radiologist's signed report (PDF, Encapsulated PDF in the PACS)."""

from fhir_facade.reading.runtime import ReadingRuntime

__all__ = ["ReadingRuntime"]
