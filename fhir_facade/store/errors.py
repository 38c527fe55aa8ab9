"""Store-specific OperationOutcome errors, built on the shared `FhirError` (fhir/errors.py)."""

from __future__ import annotations

from pydantic import ValidationError

from fhir_facade.fhir.errors import FhirError, Issue

__all__ = ["invalid_resource", "version_conflict"]

#: pydantic error type -> OperationOutcome IssueType (valueset-issue-type.html).
_ISSUE_CODES = {"missing": "required", "extra_forbidden": "structure"}


def _expression(resource_type: str, location: tuple[int | str, ...]) -> str:
    """A pydantic error location as a FHIRPath-like expression: ('input', 0, 'type') ->
    `Task.input[0].type`."""
    path = resource_type
    for step in location:
        if isinstance(step, int):
            path += f"[{step}]"
        elif not step.startswith("__"):  # pydantic's internal steps (e.g. __root__) are no element
            path += f".{step}"
    return path


def invalid_resource(resource_type: str, exc: ValidationError) -> FhirError:
    """400: the resource fails basic FHIR validation (http.html#create: "400 Bad Request -
    resource could not be parsed or failed basic FHIR validation rules"). One issue per pydantic
    error, each naming the element in `expression`."""
    issues = []
    for error in exc.errors():
        kind = error["type"].rsplit(".", 1)[-1]
        issues.append(
            Issue(
                _ISSUE_CODES.get(kind, "value"),
                f"{_expression(resource_type, tuple(error['loc']))}: {error['msg']}",
                expression=(_expression(resource_type, tuple(error["loc"])),),
            )
        )
    return FhirError(400, issues or [Issue("invalid", f"Invalid {resource_type}")])


def version_conflict(resource_type: str, resource_id: str, expected: str, current: int | None) -> FhirError:
    """412 (http.html#concurrency): `If-Match` named a version that is not the current one."""
    actual = f'W/"{current}"' if current is not None else "none (the resource does not exist)"
    return FhirError(
        412,
        [
            Issue(
                "conflict",
                f"{resource_type}/{resource_id}: If-Match {expected} does not match "
                f"the current version {actual}",
            )
        ],
    )
