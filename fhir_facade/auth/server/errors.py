"""Small helpers for RFC 6749 error responses."""

from __future__ import annotations

import re

__all__ = ["safe_description"]

# RFC 6749 5.2: error_description is %x20-21 / %x23-5B / %x5D-7E (no '"', no '\', ASCII only).
# authlib raises ValueError for anything else, so text that quotes a request must be cleaned first.
_FORBIDDEN = re.compile(r"[^\x20-\x21\x23-\x5b\x5d-\x7e]")


def safe_description(text: str, limit: int = 300) -> str:
    """``text`` with every character RFC 6749 forbids in ``error_description`` replaced by '?'."""
    cleaned = _FORBIDDEN.sub("?", text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."
