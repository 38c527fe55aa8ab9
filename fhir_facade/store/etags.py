"""If-Match ETags (FHIR R4 http.html#concurrency, RFC 9110 8.8.3): `W/"n"` -> version n."""

from __future__ import annotations

import re

from fhir_facade.fhir.errors import bad_request

__all__ = ["parse_etag"]

_ETAG = re.compile(r'^(?:W/)?"?(\d+)"?$')


def parse_etag(if_match: str) -> int:
    match = _ETAG.match(if_match.strip())
    if not match:
        raise bad_request(f"If-Match must be an ETag like W/\"1\", got '{if_match}'", expression="If-Match")
    digits = match.group(1)
    # More digits than a stored version (a 64-bit column) has: it names none (412), and int()
    # of thousands of digits would fail (the int string conversion limit).
    return int(digits) if len(digits) <= 18 else -1
