"""The OpenAPI document's error answers: each operation states the 4xx statuses it gives, each an
OperationOutcome (FHIR R4 operationoutcome.html), so API explorers and schemathesis know them.

Routes declare what is particular to their interaction with `error_responses(...)` (a read may be
404 or 410, an update 412...); `install_openapi` adds what every operation of a kind can answer,
because a middleware or the one error handler gives it: 400 (a bad parameter; FastAPI's own 422
HTTPValidationError never happens here, its validation errors are answered 400), 406 (FHIR
content negotiation), 408/413/415 for requests with a body (fhir_facade.http_limits, FHIR body
types), 401/403 behind SMART security. The /auth endpoints answer with OAuth errors
(RFC 6749 5.2), not OperationOutcomes, except for the limits.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from fhir_facade.fhir.negotiation import FHIR_JSON

__all__ = ["OPERATION_OUTCOME_SCHEMA", "error_responses", "install_openapi"]

_OUTCOME_REF = "#/components/schemas/OperationOutcome"
_OAUTH_REF = "#/components/schemas/OAuthError"

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

_OAUTH_ERROR_SCHEMA: dict[str, Any] = {
    "title": "OAuthError",
    "description": "OAuth 2.0 error response (RFC 6749 section 5.2).",
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}, "error_description": {"type": "string"}},
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
}

_BODY_METHODS = frozenset({"post", "put", "patch"})


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Entries for FastAPI's `responses=` (or an `openapi_extra` "responses"): each status
    answered with an OperationOutcome."""
    return {str(status): _outcome_response(status) for status in statuses}


def _outcome_response(status: int) -> dict[str, Any]:
    return {"description": _DESCRIPTIONS[status], "content": {FHIR_JSON: {"schema": {"$ref": _OUTCOME_REF}}}}


def _oauth_response(status: int) -> dict[str, Any]:
    return {
        "description": _DESCRIPTIONS[status],
        "content": {"application/json": {"schema": {"$ref": _OAUTH_REF}}},
    }


def _drop_fastapi_validation(responses: dict[str, Any]) -> None:
    """Remove FastAPI's automatic 422 HTTPValidationError (its validation errors are answered 400
    here), keeping a 422 that the route declared itself."""
    content = responses.get("422", {}).get("content", {})
    schema = content.get("application/json", {}).get("schema", {})
    if schema.get("$ref", "").endswith("/HTTPValidationError"):
        del content["application/json"]
        if not content:
            del responses["422"]


def _complete(path: str, method: str, operation: dict[str, Any], authenticated: bool) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    _drop_fastapi_validation(responses)
    added: dict[int, dict[str, Any]] = {}
    if method in _BODY_METHODS:
        added |= {408: _outcome_response(408), 413: _outcome_response(413)}
    if path.startswith("/auth/"):
        if method == "post":
            added |= {400: _oauth_response(400), 401: _oauth_response(401), 429: _oauth_response(429)}
    else:
        if operation.get("parameters") or method in _BODY_METHODS:
            added[400] = _outcome_response(400)
        if path.startswith("/fhir"):
            added[406] = _outcome_response(406)
            if method in _BODY_METHODS:
                added[415] = _outcome_response(415)
            if authenticated and path != "/fhir/metadata":
                added |= {401: _outcome_response(401), 403: _outcome_response(403)}
    for status, response in added.items():
        responses.setdefault(str(status), response)


def install_openapi(app: FastAPI, *, authenticated: bool) -> None:
    """Complete `app`'s generated OpenAPI document with the error answers (see the module doc);
    `authenticated`: SMART security is on (FACADE_AUTH=smart)."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = generate()
        for path, operations in document.get("paths", {}).items():
            for method, operation in operations.items():
                _complete(path, method, operation, authenticated)
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        schemas["OperationOutcome"] = OPERATION_OUTCOME_SCHEMA
        schemas["OAuthError"] = _OAUTH_ERROR_SCHEMA
        if "/HTTPValidationError" not in json.dumps(document.get("paths")):
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]
