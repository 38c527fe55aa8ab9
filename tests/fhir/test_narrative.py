"""fhir_facade.fhir.narrative: the generated-narrative machinery (R4 narrative.html)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from fhir.resources.R4B.task import Task

from fhir_facade.fhir.narrative import (
    Facts,
    Heading,
    Items,
    Paragraph,
    Table,
    is_facade_narrative,
    narrative,
    reference_text,
    with_narrative,
)
from tests.narrative_checks import narrative_text

HOSTILE = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'


def test_every_part_escapes_its_values() -> None:
    text = narrative(
        Heading(HOSTILE),
        Paragraph(HOSTILE, label=HOSTILE),
        Facts([(HOSTILE, HOSTILE), ("empty", None), ("blank", "")]),
        Table((HOSTILE,), [(HOSTILE,)]),
        Items([HOSTILE]),
    )
    assert "<script" not in text["div"] and "<img" not in text["div"]
    assert "&lt;script&gt;" in text["div"] and "&amp;" in text["div"]
    resource = {"resourceType": "Task", "text": text}
    content = narrative_text(resource, HOSTILE)  # the text reads as typed, not as markup
    assert "empty" not in content and "blank" not in content
    root = ET.fromstring(text["div"])
    assert not [e for e in root.iter() if e.tag.endswith(("script", "img"))]


def test_characters_xml_cannot_carry_are_dropped() -> None:
    text = narrative(Paragraph("a\x00b\x1bc\ttab"))
    assert narrative_text({"text": text}, "abc tab")


def test_an_empty_narrative_is_refused() -> None:
    with pytest.raises(ValueError, match="txt-2"):
        narrative(Facts([("x", None)]), None, Items([]))
    with pytest.raises(ValueError):
        Heading("x", level=7)


def test_with_narrative_places_text_after_meta_and_validates() -> None:
    task = {
        "resourceType": "Task",
        "id": "t1",
        "meta": {"versionId": "1"},
        "status": "requested",
        "intent": "order",
    }
    result = with_narrative(task, narrative(Paragraph("Do it")))
    assert list(result) == ["resourceType", "id", "meta", "text", "status", "intent"]
    Task.model_validate(result)
    assert is_facade_narrative(result["text"])


def test_a_client_narrative_is_never_overwritten_but_ours_is_regenerated() -> None:
    client = {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">Mine</div>'}
    task = {"resourceType": "Task", "text": client, "status": "requested"}
    assert with_narrative(task, narrative(Paragraph("ours")))["text"] == client
    assert not is_facade_narrative(client)
    ours = with_narrative({"resourceType": "Task"}, narrative(Paragraph("first")))
    again = with_narrative(ours, narrative(Paragraph("second")))
    assert "second" in again["text"]["div"] and "first" not in again["text"]["div"]


def test_reference_text() -> None:
    assert reference_text({"reference": "Patient/1", "display": "Doe, J"}) == "Doe, J (Patient/1)"
    assert reference_text({"reference": "Patient/1"}) == "Patient/1"
    assert reference_text({"identifier": {"value": "MRN-1"}}) == "MRN-1"
    assert reference_text(None) is None
