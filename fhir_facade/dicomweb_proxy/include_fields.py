"""QIDO-RS `includefield` lists, split into one `includefield` per attribute before forwarding.

PS3.18 8.3.4.3 lets a client name several attributes in one `includefield` value, separated by
commas, and a URL-encoding client (OHIF 3, dicomweb-client) sends the comma as `%2C`. Orthanc 1.10.1
with DICOMweb 1.7 takes `includefield=00081030,00080060` but ignores `includefield=00081030%2C00080060`
altogether (checked against the real server), so a viewer gets no StudyDescription. One
`includefield` per attribute is what every server takes.

Only `includefield` pairs are touched; every other pair of the client's query string stays byte for
byte what it sent (see `confinement`: Orthanc's percent-decoding is not what a re-encoding would
assume).
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

__all__ = ["split_include_fields"]

_INCLUDE_FIELD = "includefield"
_LIST_SEPARATOR = re.compile(r",|%2[cC]")


def split_include_fields(raw_query: str) -> str:
    """`raw_query` with each `includefield=a,b` (comma as is or percent-encoded) written as
    `includefield=a&includefield=b`; empty list items are dropped, each item kept as sent."""
    if not raw_query:
        return raw_query
    pairs: list[str] = []
    for pair in raw_query.split("&"):
        name, equals, value = pair.partition("=")
        if equals and unquote_plus(name).lower() == _INCLUDE_FIELD:
            items = [item for item in _LIST_SEPARATOR.split(value) if item]
            if items:
                pairs += [f"{name}={item}" for item in items]
                continue
        pairs.append(pair)
    return "&".join(pairs)
