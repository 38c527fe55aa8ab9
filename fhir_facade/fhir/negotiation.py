"""Content negotiation (FHIR R4 http.html#mime-type): JSON only, chosen by `_format` or Accept.

XML and Turtle are valid FHIR formats we do not produce: asking only for them is a 406, sending
them a 415. `_format` overrides Accept, as the spec says.
"""

from __future__ import annotations

from fastapi import Request

from fhir_facade.fhir.errors import not_acceptable, unsupported_media_type

__all__ = ["FHIR_JSON", "check_request_body_type", "negotiate_response_format", "wants_pretty"]

FHIR_JSON = "application/fhir+json"

_JSON_FORMATS = frozenset({"json", "application/json", "application/fhir+json", "application/json+fhir"})
_JSON_ACCEPTS = _JSON_FORMATS | {"*/*", "application/*"}
_BODY_TYPES = frozenset({"application/fhir+json", "application/json", "application/json+fhir"})
FORM_TYPE = "application/x-www-form-urlencoded"


def _media_types(header: str) -> list[tuple[str, float]]:
    """Parse an Accept header into (media type, q) pairs."""
    result = []
    for item in header.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if media:
            result.append((media.lower(), q))
    return result


def negotiate_response_format(request: Request) -> str:
    """Return the response media type, or raise 406 when the client accepts no JSON."""
    fmt = request.query_params.get("_format")
    if fmt is not None:
        if fmt.split(";")[0].strip().lower() not in _JSON_FORMATS:
            raise not_acceptable(f"_format={fmt} is not supported; this server speaks {FHIR_JSON}")
        return FHIR_JSON
    accept = request.headers.get("accept", "").strip()
    if not accept:
        return FHIR_JSON
    media_types = _media_types(accept)
    if any(media in _JSON_ACCEPTS and q > 0 for media, q in media_types):
        return FHIR_JSON
    raise not_acceptable(f"Accept: {accept} is not supported; this server speaks {FHIR_JSON}")


def check_request_body_type(request: Request, *, allow_form: bool = False) -> None:
    """Raise 415 unless the body is FHIR JSON (or a form, for POST _search)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in _BODY_TYPES or (allow_form and content_type == FORM_TYPE):
        return
    raise unsupported_media_type(
        f"Content-Type '{content_type or '(none)'}' is not supported; send {FHIR_JSON}"
    )


def wants_pretty(request: Request) -> bool:
    return request.query_params.get("_pretty", "").lower() == "true"
