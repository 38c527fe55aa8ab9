"""Parsing client JSON within bounds: nesting depth and number length, checked at the parse.

Python's `json` module has no limits of its own that a server can rely on: a 5,000-digit integer
raises ValueError (the int string conversion limit, CVE-2020-10735), a body nested about 1,000
deep raises RecursionError, and anything less deep parses fine and then overflows the stack of
whatever walks it recursively later (Bundle processing, reference rewriting). OWASP's API
Security Top 10 (API4:2023, unrestricted resource consumption) and Jackson's
StreamReadConstraints (HAPI's parser: maximum nesting depth and number length) are the models:
every request body is parsed here, and whatever exceeds a bound is the client's error (400),
never the server's (500).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from fhir_facade.fhir.errors import FhirError, bad_request
from fhir_facade.fhir.settings import JsonLimitSettings

__all__ = ["JsonLimits", "parse_json"]


@dataclass(frozen=True)
class JsonLimits:
    """How deep a JSON body may nest (objects and arrays, the document itself is depth 1) and how
    long one number literal may be (characters, sign, point and exponent included)."""

    max_depth: int = 100
    max_number_length: int = 64

    @classmethod
    def from_settings(cls, settings: JsonLimitSettings) -> JsonLimits:
        return cls(settings.limits_json_max_depth, settings.limits_json_max_number_length)


class _LimitExceeded(ValueError):
    """Raised from inside the decoder's number hooks; turned into a 400 by `parse_json`."""


def parse_json(raw: bytes | str, limits: JsonLimits) -> Any:
    """The JSON value of `raw`, or a 400 FhirError (IssueType `structure`) when it is not JSON
    (RFC 8259), uses NaN/Infinity (not JSON, and FHIR decimals must be finite: R4 datatypes.html
    #decimal), holds a number literal longer than `limits.max_number_length`, or nests deeper
    than `limits.max_depth`."""

    def number(kind: type[int] | type[float]) -> Any:
        def convert(literal: str) -> int | float:
            if len(literal) > limits.max_number_length:
                raise _LimitExceeded(
                    f"a number of {len(literal)} characters (at most {limits.max_number_length})"
                )
            value = kind(literal)
            if isinstance(value, float) and not math.isfinite(value):
                raise _LimitExceeded(f"the number {literal[:20]} is out of range")
            return value

        return convert

    def constant(name: str) -> Any:
        raise _LimitExceeded(f"{name} is not a JSON number")

    try:
        value = json.loads(raw, parse_int=number(int), parse_float=number(float), parse_constant=constant)
    except _LimitExceeded as exc:
        raise _structure(f"The body holds {exc}") from exc
    except RecursionError as exc:
        raise _too_deep(limits) from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _structure(f"The body is not valid JSON: {exc}") from exc
    if _deeper_than(value, limits.max_depth):
        raise _too_deep(limits)
    return value


def _structure(diagnostics: str) -> FhirError:
    return bad_request(diagnostics, code="structure")


def _too_deep(limits: JsonLimits) -> FhirError:
    return _structure(f"The body nests objects and arrays more than {limits.max_depth} deep")


def _deeper_than(value: Any, max_depth: int) -> bool:
    """Whether objects and arrays nest deeper than `max_depth`; iterative, so it is safe at any
    depth the parser returned."""
    if not isinstance(value, dict | list):
        return False
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False
