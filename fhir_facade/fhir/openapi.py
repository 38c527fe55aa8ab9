"""The OpenAPI document's error answers: each operation states the 4xx and 5xx statuses it gives,
each an OperationOutcome (FHIR R4 operationoutcome.html), so API explorers and schemathesis know
them.

Routes declare what is particular to them with `error_responses(...)` (a read may be 404 or 410, an
update 412...; routes that are not FHIR, such as /auth or /dicom-web, declare their own answers next
to their code); `install_openapi` adds what every operation of a kind can answer, because a
middleware or the one error handler (fhir_facade.fhir.responses) gives it, keeping what a route
declared for the same status:
- every operation: 413 (a declared Content-Length over the limit is refused before routing,
  fhir_facade.http_limits) and 500 (an unexpected failure); with a body also 408;
- with parameters or a body: 400 (FastAPI's own 422 HTTPValidationError never happens here, its
  validation errors are answered 400);
- behind the bearer token (a `security` requirement, FACADE_AUTH=smart): 401 and 403;
- under /fhir (but /fhir/.well-known, SMART's): 406 (FHIR content negotiation), 415 with a body
  (FHIR JSON only), and a tag: the resource type of `[base]/[type]/...` (FHIR R4 http.html), else
  "FHIR system".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from fhir_facade.fhir.negotiation import FHIR_JSON

__all__ = ["FHIR_SYSTEM_TAG", "OPERATION_OUTCOME_SCHEMA", "error_responses", "install_openapi"]

_OUTCOME_REF = "#/components/schemas/OperationOutcome"

#: What the facade's error bodies hold (fhir_facade.fhir.errors.Issue.to_fhir).
OPERATION_OUTCOME_SCHEMA: dict[str, Any] = {
    "title": "OperationOutcome",
    "description": "FHIR R4 OperationOutcome (http://hl7.org/fhir/R4/operationoutcome.html): why it failed.",
    "type": "object",
    "required": ["resourceType", "issue"],
    "properties": {
        "resourceType": {"const": "OperationOutcome"},
        "issue": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["severity", "code"],
                "properties": {
                    "severity": {"enum": ["fatal", "error", "warning", "information"]},
                    "code": {
                        "type": "string",
                        "description": "IssueType (http://hl7.org/fhir/R4/valueset-issue-type.html)",
                    },
                    "diagnostics": {"type": "string"},
                    "details": {"type": "object"},
                    "expression": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}

_DESCRIPTIONS = {
    400: "Bad request: a malformed parameter or body (JSON too deep, numbers too long...)",
    401: "No valid access token (RFC 6750 section 3)",
    403: "The token's scopes do not allow this (insufficient_scope)",
    404: "No such resource, version or type",
    405: "The interaction is not supported on this type",
    406: "Only FHIR JSON is produced (_format/Accept)",
    408: "The request body stopped arriving (idle longer than FACADE_LIMITS_BODY_TIMEOUT)",
    409: "Conflicts with the resource's current state",
    410: "The resource was deleted",
    412: "A condition (If-Match, If-None-Exist, conditional update) does not hold",
    413: "The request body is larger than the server accepts",
    415: "The body is not FHIR JSON",
    422: "Well-formed, but the content cannot be processed",
    429: "Too many attempts; retry after Retry-After seconds",
    500: "Unexpected server error (logged with the request's X-Correlation-ID)",
    501: "Not configured on this server",
    502: "The PACS gave an answer the facade could not use (dicom_service_error)",
    503: "The PACS is unreachable or timed out (dicom_service_unavailable)",
    504: "The operation ran past its time limit",
}

#: The tag of FHIR operations at the base or across types (`[base]`, `[base]/metadata`, `[base]/$op`).
FHIR_SYSTEM_TAG = "FHIR system"

_BODY_METHODS = frozenset({"post", "put", "patch"})


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Entries for FastAPI's `responses=` (or an `openapi_extra` "responses"): each status
    answered with an OperationOutcome."""
    return {str(status): _outcome_response(status) for status in statuses}


def _outcome_response(status: int) -> dict[str, Any]:
    return {"description": _DESCRIPTIONS[status], "content": {FHIR_JSON: {"schema": {"$ref": _OUTCOME_REF}}}}


def _drop_fastapi_validation(responses: dict[str, Any]) -> None:
    """Remove FastAPI's automatic 422 HTTPValidationError (its validation errors are answered 400
    here), keeping a 422 that the route declared itself."""
    content = responses.get("422", {}).get("content", {})
    schema = content.get("application/json", {}).get("schema", {})
    if schema.get("$ref", "").endswith("/HTTPValidationError"):
        del content["application/json"]
        if not content:
            del responses["422"]


def _fhir_tag(path: str) -> str:
    """`[base]/[type]/...` -> the type; anything else at the FHIR base -> FHIR_SYSTEM_TAG."""
    first = path.removeprefix("/fhir").lstrip("/").split("/", 1)[0]
    return first if first[:1].isupper() else FHIR_SYSTEM_TAG


def _complete(path: str, method: str, operation: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    _drop_fastapi_validation(responses)
    added: dict[int, dict[str, Any]] = {}
    body = method in _BODY_METHODS
    if operation.get("parameters") or body:
        added[400] = _outcome_response(400)
    if operation.get("security"):
        added |= {401: _outcome_response(401), 403: _outcome_response(403)}
    if body:
        added[408] = _outcome_response(408)
    added[413] = _outcome_response(413)
    if (path == "/fhir" or path.startswith("/fhir/")) and not path.startswith("/fhir/.well-known/"):
        added[406] = _outcome_response(406)
        if body:
            added[415] = _outcome_response(415)
        operation.setdefault("tags", [_fhir_tag(path)])
    added[500] = _outcome_response(500)
    for status, response in sorted(added.items()):
        responses.setdefault(str(status), response)


def install_openapi(app: FastAPI) -> None:
    """Complete `app`'s generated OpenAPI document with the error answers (see the module doc)."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = generate()
        for path, operations in document.get("paths", {}).items():
            for method, operation in operations.items():
                _complete(path, method, operation)
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        schemas["OperationOutcome"] = OPERATION_OUTCOME_SCHEMA
        if "/HTTPValidationError" not in json.dumps(document.get("paths")):
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]
