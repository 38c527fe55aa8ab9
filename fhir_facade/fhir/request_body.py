"""Reading a resource from a request body: FHIR JSON only, well-formed, of the expected type."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from fhir_facade.fhir.errors import bad_request
from fhir_facade.fhir.negotiation import check_request_body_type

__all__ = ["read_resource"]


async def read_resource(request: Request, expected_type: str | None = None) -> dict[str, Any]:
    """The body as a resource dict; 415 for other media types, 400 for bad JSON or a wrong type."""
    check_request_body_type(request)
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"The body is not valid JSON: {exc}", code="structure") from exc
    if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
        raise bad_request("The body is not a FHIR resource (no resourceType)", code="structure")
    if expected_type and body["resourceType"] != expected_type:
        raise bad_request(
            f"Expected a {expected_type}, got a {body['resourceType']}",
            expression="resourceType",
            code="invalid",
        )
    return body
