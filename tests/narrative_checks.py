"""Checks of a generated narrative (R4 narrative.html), shared by the tests of every resource kind
the facade writes or computes."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from fhir_facade.fhir.narrative import ALLOWED_ELEMENTS, MARKER_CLASS, XHTML_NAMESPACE

_NS = f"{{{XHTML_NAMESPACE}}}"


def narrative_text(resource: dict[str, Any], *facts: str) -> str:
    """Assert `resource.text` is a generated narrative that follows R4's rules (one xhtml div,
    basic elements only, no attribute but the marker class, non-empty: txt-1, txt-2) and names every
    one of `facts`; return its text content."""
    text = resource["text"]
    assert text["status"] == "generated"
    root = ET.fromstring(text["div"])  # well-formed XML, or this raises
    assert root.tag == f"{_NS}div"
    assert root.attrib == {"class": MARKER_CLASS}
    for element in root.iter():
        assert element.tag.startswith(_NS), element.tag
        assert element.tag.removeprefix(_NS) in ALLOWED_ELEMENTS, element.tag
        if element is not root:
            assert element.attrib == {}, element.attrib
    content = " ".join(" ".join(root.itertext()).split())
    assert content, "txt-2: the narrative has no content"
    for fact in facts:
        assert fact in content, f"{fact!r} not in narrative: {content}"
    return content
