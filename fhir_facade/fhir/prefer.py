"""The `Prefer` request header (RFC 7240) as FHIR uses it: `handling=strict|lenient` for search
(search.html#errors) and `return=minimal|representation|OperationOutcome` for writes
(http.html#ops)."""

from __future__ import annotations

from fastapi import Request

__all__ = ["prefers_async", "prefers_strict_handling", "return_preference"]

_RETURN_VALUES = ("minimal", "representation", "OperationOutcome")


def _preferences(request: Request) -> dict[str, str]:
    prefs: dict[str, str] = {}
    for header in request.headers.getlist("prefer"):
        for item in header.split(","):
            key, _, value = item.strip().partition("=")
            if key:
                prefs[key.strip().lower()] = value.strip().strip('"')
    return prefs


def prefers_strict_handling(request: Request) -> bool:
    return _preferences(request).get("handling") == "strict"


def return_preference(request: Request) -> str:
    """`representation` unless the client asked for `minimal` or `OperationOutcome`."""
    value = _preferences(request).get("return", "representation")
    return value if value in _RETURN_VALUES else "representation"


def prefers_async(request: Request) -> bool:
    """`Prefer: respond-async` (FHIR async pattern, RFC 7240 section 4.1)."""
    return "respond-async" in _preferences(request)
