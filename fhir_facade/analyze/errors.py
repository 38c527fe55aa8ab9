"""The analysis's own errors (ADR 0006): the model ran too long, or its output could not be
mapped to FHIR. Their detail codes are in capability/CodeSystem-facade-issue.json."""

from __future__ import annotations

from fhir_facade.fhir.errors import FhirError, error

__all__ = ["ai_inference_timeout", "fhir_mapping_error"]


def ai_inference_timeout(diagnostics: str) -> FhirError:
    """504: the analysis ran past its time limit and was abandoned."""
    return error(504, "timeout", diagnostics, detail_code="ai_inference_timeout")


def fhir_mapping_error(diagnostics: str) -> FhirError:
    """500: the model ran, but its result could not be turned into valid FHIR (a bug or a bad
    model package); nothing was stored."""
    return error(500, "exception", diagnostics, detail_code="fhir_mapping_error")
