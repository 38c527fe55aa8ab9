"""Typed FHIR errors. Every failure the server reports is one of these, and one place
(`fhir_facade.fhir.responses`) turns it into an OperationOutcome response (FHIR R4 operationoutcome.html).

Handlers and clients raise these; they never build error responses themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FACADE_ISSUE_SYSTEM",
    "FhirError",
    "Issue",
    "bad_request",
    "conflict",
    "error",
    "gone",
    "internal_error",
    "method_not_allowed",
    "not_acceptable",
    "not_found",
    "not_supported",
    "payload_too_large",
    "precondition_failed",
    "request_timeout",
    "unprocessable",
    "unsupported_media_type",
]

#: CodeSystem of the facade's own machine-readable error codes (capability/CodeSystem-facade-issue.json).
FACADE_ISSUE_SYSTEM = "http://fhir-facade.org/fhir/CodeSystem/facade-issue"


@dataclass(frozen=True)
class Issue:
    """One OperationOutcome.issue: severity, IssueType code, text, optional detail code and FHIRPath."""

    code: str
    diagnostics: str
    severity: str = "error"
    detail_code: str | None = None
    expression: tuple[str, ...] = ()

    def to_fhir(self) -> dict[str, Any]:
        issue: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "diagnostics": self.diagnostics,
        }
        if self.detail_code:
            issue["details"] = {
                "coding": [{"system": FACADE_ISSUE_SYSTEM, "code": self.detail_code}],
                "text": self.diagnostics,
            }
        if self.expression:
            issue["expression"] = list(self.expression)
        return issue


@dataclass
class FhirError(Exception):
    """An error with its HTTP status and OperationOutcome issues."""

    status: int
    issues: list[Issue]
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.issues[0].diagnostics if self.issues else str(self.status))

    def operation_outcome(self) -> dict[str, Any]:
        return {"resourceType": "OperationOutcome", "issue": [i.to_fhir() for i in self.issues]}


def error(status: int, code: str, diagnostics: str, **kwargs: Any) -> FhirError:
    """A one-issue FhirError; the keyword arguments are those of `Issue`, and `headers`. The
    constructors of errors that belong to one part of the server (the PACS, the model, OAuth) live
    in that part and build on this."""
    headers = kwargs.pop("headers", None) or {}
    return FhirError(status, [Issue(code, diagnostics, **kwargs)], headers)


def bad_request(diagnostics: str, *, expression: str | None = None, code: str = "invalid") -> FhirError:
    """400: the request is malformed (e.g. a bad search parameter value, named in `expression`)."""
    return error(400, code, diagnostics, expression=(expression,) if expression else ())


def precondition_failed(diagnostics: str) -> FhirError:
    """412: a condition of the request (If-Match, conditional create/update) does not hold."""
    return error(412, "conflict", diagnostics)


def conflict(diagnostics: str, *, expression: str | None = None) -> FhirError:
    """409: the request conflicts with the resource's current state (e.g. a Task transition)."""
    return error(409, "conflict", diagnostics, expression=(expression,) if expression else ())


def not_found(diagnostics: str) -> FhirError:
    """404: no such resource (FHIR http.html#read)."""
    return error(404, "not-found", diagnostics)


def gone(diagnostics: str) -> FhirError:
    """410: the resource was deleted (FHIR http.html#read)."""
    return error(410, "deleted", diagnostics)


def not_supported(diagnostics: str, *, status: int = 404) -> FhirError:
    """An interaction or resource type this server does not offer."""
    return error(status, "not-supported", diagnostics)


def method_not_allowed(diagnostics: str) -> FhirError:
    """405: the interaction exists in FHIR but not on this resource type here."""
    return error(405, "not-supported", diagnostics)


def not_acceptable(diagnostics: str) -> FhirError:
    """406: the client asked for a representation we cannot produce (FHIR http.html#mime-type)."""
    return error(406, "not-supported", diagnostics)


def unsupported_media_type(diagnostics: str) -> FhirError:
    """415: the request body is not in a format we read."""
    return error(415, "not-supported", diagnostics)


def payload_too_large(limit: int) -> FhirError:
    """413 (RFC 9110 15.5.14): the body is larger than this server accepts, IssueType `too-long`.
    The rest of the body is not read, so the connection is closed after the answer."""
    return error(
        413,
        "too-long",
        f"The request body exceeds the limit of {limit} bytes",
        headers={"Connection": "close"},
    )


def request_timeout(seconds: float) -> FhirError:
    """408 (RFC 9110 15.5.9): the client stopped sending the body it announced; the connection is
    closed ("the server SHOULD send the close connection option")."""
    return error(
        408,
        "timeout",
        f"No request body data arrived for {seconds:g} s",
        headers={"Connection": "close"},
    )


def unprocessable(diagnostics: str, *, detail_code: str, code: str = "processing") -> FhirError:
    """422: the request is well-formed but cannot be carried out on this content (e.g. a study
    with no images the model applies to)."""
    return error(422, code, diagnostics, detail_code=detail_code)


def internal_error(diagnostics: str = "Internal server error; see the server log.") -> FhirError:
    """500: a bug. The body never carries a stack trace."""
    return error(500, "exception", diagnostics)
