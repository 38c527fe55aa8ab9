"""PACS failures as FHIR errors (ADR 0025): the one module of `dicomweb` that knows FHIR, and only
its error values. The clients raise `DicomwebError`s; the application registers
`PACS_ERROR_TRANSLATORS` with `fhir.responses.install_error_handlers`, and code that talks to the
PACS inside a FHIR operation raises `dicom_service_unavailable` itself."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from fhir_facade.dicomweb.errors import DicomwebError, DicomwebUnavailable
from fhir_facade.fhir.errors import FhirError, Issue, error

__all__ = ["PACS_ERROR_TRANSLATORS", "dicom_service_unavailable", "pacs_error"]

log = logging.getLogger(__name__)


def dicom_service_unavailable(diagnostics: str) -> FhirError:
    """503: the PACS did not answer (unreachable, timed out or failing); the client may retry."""
    return error(
        503,
        "transient",
        diagnostics,
        detail_code="dicom_service_unavailable",
        headers={"Retry-After": "5"},
    )


def pacs_error(exc: DicomwebError) -> FhirError:
    """Unavailable (transport, timeout, 5xx) is the client's "retry later" (503); any other PACS
    failure is a bad gateway (502 `dicom_service_error`): the request was fine, the PACS answer
    was not."""
    log.warning("PACS error: %s", exc)
    if isinstance(exc, DicomwebUnavailable):
        return dicom_service_unavailable(str(exc))
    return FhirError(502, [Issue("exception", str(exc), detail_code="dicom_service_error")])


#: For `install_error_handlers`: a DicomwebError escaping a route becomes an OperationOutcome.
PACS_ERROR_TRANSLATORS: Mapping[type[Exception], Callable[[Any], FhirError]] = {DicomwebError: pacs_error}
