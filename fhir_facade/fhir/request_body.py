"""Reading a resource from a request body: FHIR JSON only, well-formed, of the expected type,
within the JSON limits of the settings (fhir_facade.fhir.json_limits)."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from fhir_facade.fhir.errors import bad_request
from fhir_facade.fhir.json_limits import JsonLimits, parse_json
from fhir_facade.fhir.negotiation import check_request_body_type

__all__ = ["read_resource"]


async def read_resource(request: Request, expected_type: str | None = None) -> dict[str, Any]:
    """The body as a resource dict; 415 for other media types, 400 for bad or unbounded JSON
    (too deep, too long a number) or a wrong type."""
    check_request_body_type(request)
    raw = await request.body()
    body = parse_json(raw, JsonLimits.from_settings(request.app.state.settings))
    if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
        raise bad_request("The body is not a FHIR resource (no resourceType)", code="structure")
    if expected_type and body["resourceType"] != expected_type:
        raise bad_request(
            f"Expected a {expected_type}, got a {body['resourceType']}",
            expression="resourceType",
            code="invalid",
        )
    return body
