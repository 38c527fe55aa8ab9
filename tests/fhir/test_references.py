"""fhir/references.py: every literal reference form of FHIR R4 references.html."""

from __future__ import annotations

import pytest

from fhir_facade.fhir.ids import is_fhir_id
from fhir_facade.fhir.references import ReferenceKind, local_target, parse_reference

BASE = "https://facade.example/fhir"


@pytest.mark.parametrize(
    ("reference", "kind", "named"),
    [
        ("Patient/p1", ReferenceKind.LOCAL, ("Patient", "p1", None)),
        ("Patient/p1/_history/3", ReferenceKind.LOCAL, ("Patient", "p1", "3")),
        (f"{BASE}/Observation/o.1", ReferenceKind.LOCAL, ("Observation", "o.1", None)),
        (f"{BASE}/Observation/o/_history/2", ReferenceKind.LOCAL, ("Observation", "o", "2")),
        ("https://other.example/fhir/Patient/x", ReferenceKind.EXTERNAL, ("Patient", "x", None)),
        ("https://other.example/", ReferenceKind.EXTERNAL, (None, None, None)),
        ("#c1", ReferenceKind.CONTAINED, (None, "c1", None)),
        ("urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a", ReferenceKind.URN, (None, None, None)),
        ("Patient/", ReferenceKind.INVALID, (None, None, None)),
        ("patient/1", ReferenceKind.INVALID, (None, None, None)),
        ("Patient/1/extra", ReferenceKind.INVALID, (None, None, None)),
        ("Patient/" + "a" * 65, ReferenceKind.INVALID, (None, None, None)),
    ],
)
def test_parse_reference(reference: str, kind: ReferenceKind, named: tuple[str | None, ...]) -> None:
    parsed = parse_reference(reference, BASE)
    assert parsed.kind is kind
    assert (parsed.resource_type, parsed.id, parsed.version) == named
    assert parsed.raw == reference


def test_local_target_names_the_resource_of_a_versioned_reference() -> None:
    assert local_target("Task/t1/_history/4") == ("Task", "t1")
    assert local_target(f"{BASE}/Task/t1", BASE) == ("Task", "t1")
    assert local_target(f"{BASE}/Task/t1") is None  # absolute without knowing our base: external
    assert local_target("#contained") is None
    assert local_target("urn:uuid:1") is None


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("a", True),
        ("A-b.9", True),
        ("a" * 64, True),
        ("", False),
        ("a" * 65, False),
        ("a_b", False),
        ("a\n", False),
    ],
)
def test_fhir_id(value: str, valid: bool) -> None:
    assert is_fhir_id(value) is valid
