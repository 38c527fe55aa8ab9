"""SMART App Launch 2.x scopes (scopes-and-launch-context.html): parsing and what a token may do."""

from __future__ import annotations

import re

import pytest

from fhir_facade.auth.scopes import (
    Interaction,
    InvalidScope,
    ResourceScope,
    Scopes,
    parse_scope,
    parse_scopes,
    requirements_for_analyze,
)

C, R, U, D, S = (
    Interaction.CREATE,
    Interaction.READ,
    Interaction.UPDATE,
    Interaction.DELETE,
    Interaction.SEARCH,
)

#: Every resource type the facade serves (virtual, persistent, and conformance resources).
SERVED_TYPES = (
    "ImagingStudy",
    "Patient",
    "Endpoint",
    "ServiceRequest",
    "Task",
    "DiagnosticReport",
    "Observation",
    "Device",
    "Provenance",
    "OperationDefinition",
    "ConceptMap",
    "CodeSystem",
)

#: Token scope -> {type or "*": the permission letters it grants}, written out by hand from the spec
#: rather than derived from the code under test.
MATRIX: dict[str, dict[str, str]] = {
    # v2, one type
    "patient/Observation.rs": {"Observation": "rs"},
    "user/Task.cu": {"Task": "cu"},
    "system/Provenance.d": {"Provenance": "d"},
    "patient/Patient.r": {"Patient": "r"},
    "user/ServiceRequest.s": {"ServiceRequest": "s"},
    "system/DiagnosticReport.cruds": {"DiagnosticReport": "cruds"},
    # v2 wildcard
    "patient/*.rs": {"*": "rs"},
    "user/*.cruds": {"*": "cruds"},
    "system/*.c": {"*": "c"},
    # v1
    "patient/Observation.read": {"Observation": "rs"},
    "user/DiagnosticReport.write": {"DiagnosticReport": "cud"},
    "user/Device.*": {"Device": "cruds"},
    "patient/*.read": {"*": "rs"},
    "system/*.write": {"*": "cud"},
    "system/*.*": {"*": "cruds"},
    # mixed contexts and versions: grants add up
    "patient/ImagingStudy.rs user/DiagnosticReport.c system/Task.cu": {
        "ImagingStudy": "rs",
        "DiagnosticReport": "c",
        "Task": "cu",
    },
    "patient/*.s user/Observation.read system/Endpoint.r": {"*": "s", "Observation": "rs", "Endpoint": "r"},
    "user/CodeSystem.r user/ConceptMap.r user/OperationDefinition.rs": {
        "CodeSystem": "r",
        "ConceptMap": "r",
        "OperationDefinition": "rs",
    },
    # query-restricted: still allowed at type level; the narrowing is query_restrictions' job
    "patient/Observation.rs?category=laboratory": {"Observation": "rs"},
    # non-resource scopes only: nothing
    "openid fhirUser launch launch/patient offline_access online_access": {},
    "": {},
    # non-resource scopes next to resource scopes change nothing
    "openid fhirUser launch/patient patient/Patient.rs": {"Patient": "rs"},
}


def _expected(grants: dict[str, str], resource_type: str, interaction: Interaction) -> bool:
    letters = grants.get(resource_type, "") + grants.get("*", "")
    return interaction.value in letters


MATRIX_CELLS = [
    pytest.param(
        scope,
        resource_type,
        interaction,
        _expected(grants, resource_type, interaction),
        id=f"{scope or 'empty'}|{resource_type}|{interaction.value}",
    )
    for scope, grants in MATRIX.items()
    for resource_type in SERVED_TYPES
    for interaction in Interaction
]


@pytest.mark.parametrize(("scope", "resource_type", "interaction", "allowed"), MATRIX_CELLS)
def test_scope_matrix(scope: str, resource_type: str, interaction: Interaction, allowed: bool) -> None:
    scopes = parse_scopes(scope)
    assert scopes.allows(interaction, resource_type) is allowed
    assert bool(scopes.contexts_for(interaction, resource_type)) is allowed


@pytest.mark.parametrize(("scope", "resource_type", "interaction"), [c.values[:3] for c in MATRIX_CELLS])
def test_missing_scope_for_names_a_scope_that_grants(
    scope: str, resource_type: str, interaction: Interaction
) -> None:
    scopes = parse_scopes(scope)
    missing = scopes.missing_scope_for(interaction, resource_type)
    assert re.fullmatch(r"(patient|user|system)/[A-Za-z]+\.(rs|c|u|d)", missing)
    assert parse_scopes(missing).allows(interaction, resource_type)
    assert parse_scopes(f"{scope} {missing}").allows(interaction, resource_type)


@pytest.mark.parametrize(
    ("scope", "interaction", "resource_type", "missing"),
    [
        ("patient/ImagingStudy.rs", R, "Observation", "patient/Observation.rs"),
        ("patient/ImagingStudy.rs", S, "Observation", "patient/Observation.rs"),
        ("system/*.rs", C, "Observation", "system/Observation.c"),
        ("user/Task.r system/Task.r", U, "Task", "user/Task.u"),
        ("system/Task.r", D, "Task", "system/Task.d"),
        ("openid fhirUser launch/patient", R, "DiagnosticReport", "patient/DiagnosticReport.rs"),
        ("openid fhirUser", C, "ServiceRequest", "user/ServiceRequest.c"),
        ("", R, "Patient", "user/Patient.rs"),
    ],
)
def test_missing_scope_for_uses_the_tokens_context(
    scope: str, interaction: Interaction, resource_type: str, missing: str
) -> None:
    assert parse_scopes(scope).missing_scope_for(interaction, resource_type) == missing


@pytest.mark.parametrize(
    ("scope", "reason"),
    [
        ("patient/Observation.rc", "out of order"),
        ("patient/Observation.sr", "out of order"),
        ("user/Task.dc", "out of order"),
        ("patient/Observation.rr", "repeated"),
        ("patient/Observation.crrs", "repeated"),
        ("patient/Observation.", "no permissions"),
        ("patient/Observation", "expected '<Type|*>.<permissions>'"),
        ("doctor/Observation.r", "unknown context 'doctor'"),
        ("Patient/Observation.r", "unknown context 'Patient'"),
        ("patient/observation.r", "not a FHIR resource type"),
        ("patient/.rs", "not a FHIR resource type"),
        ("patient/Obs-ervation.rs", "not a FHIR resource type"),
        ("patient/Observation.x", "unknown permission 'x'"),
        ("patient/Observation.R", "unknown permission 'R'"),
        ("patient/Observation.reads", "unknown permission 'e'"),
        ("patient/Observation.rs?", "not followed by name=value"),
        ("patient/Observation.rs?category", "not name=value"),
        ("patient/Observation.rs?category=", "needs a name and a value"),
        ("patient/Observation.rs?=laboratory", "needs a name and a value"),
        ("patient/Observation.read?category=laboratory", "v1 scope"),
    ],
)
def test_malformed_resource_scope_raises(scope: str, reason: str) -> None:
    with pytest.raises(InvalidScope, match=re.escape(reason)) as caught:
        parse_scope(scope)
    assert caught.value.scope == scope
    assert isinstance(caught.value, ValueError)
    # one bad scope spoils the whole scope string
    with pytest.raises(InvalidScope):
        parse_scopes(f"openid patient/Patient.rs {scope}")


@pytest.mark.parametrize(
    "scope",
    [
        "openid",
        "fhirUser",
        "profile",
        "launch",
        "launch/patient",
        "launch/encounter",
        "offline_access",
        "online_access",
        "https://example.org/api/records.read",
        "api://facade/.default",
    ],
)
def test_non_resource_scopes_grant_nothing(scope: str) -> None:
    assert parse_scope(scope) is None
    scopes = parse_scopes(scope)
    assert scopes.resources == ()
    assert scopes.other == (scope,)
    assert not any(scopes.allows(i, t) for i in Interaction for t in SERVED_TYPES)


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        ("patient/Observation.rs", ResourceScope("patient", "Observation", frozenset({R, S}))),
        ("user/*.cruds", ResourceScope("user", "*", frozenset(Interaction))),
        ("system/Task.cud", ResourceScope("system", "Task", frozenset({C, U, D}))),
        ("patient/Observation.read", ResourceScope("patient", "Observation", frozenset({R, S}))),
        ("user/Task.write", ResourceScope("user", "Task", frozenset({C, U, D}))),
        ("system/*.*", ResourceScope("system", "*", frozenset(Interaction))),
        (
            "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory",
            ResourceScope(
                "patient",
                "Observation",
                frozenset({R, S}),
                (("category", "http://terminology.hl7.org/CodeSystem/observation-category|laboratory"),),
            ),
        ),
        (
            "patient/Observation.rs?status=final&category=laboratory",
            ResourceScope(
                "patient", "Observation", frozenset({R, S}), (("category", "laboratory"), ("status", "final"))
            ),
        ),
        (
            "user/Observation.s?code=a%26b",
            ResourceScope("user", "Observation", frozenset({S}), (("code", "a&b"),)),
        ),
    ],
)
def test_parse_scope(scope: str, expected: ResourceScope) -> None:
    parsed = parse_scope(scope)
    assert parsed == expected
    assert parse_scope(expected.text) == expected  # the normalised text round-trips


@pytest.mark.parametrize(
    ("scope", "text"),
    [
        ("patient/Observation.read", "patient/Observation.rs"),
        ("user/Task.write", "user/Task.cud"),
        ("system/*.*", "system/*.cruds"),
        (
            "patient/Observation.rs?status=final&category=laboratory",
            "patient/Observation.rs?category=laboratory&status=final",
        ),
        ("user/Observation.s?code=a%26b", "user/Observation.s?code=a%26b"),
    ],
)
def test_scope_text_is_normalised_v2(scope: str, text: str) -> None:
    parsed = parse_scope(scope)
    assert parsed is not None
    assert parsed.text == text


def test_granted_text_normalises_sorts_and_deduplicates() -> None:
    scopes = parse_scopes(
        "openid patient/Observation.read  patient/Observation.rs launch/patient openid\tuser/*.*"
    )
    assert scopes.granted_text == "launch/patient openid patient/Observation.rs user/*.cruds"
    assert len(scopes.resources) == 2
    assert scopes.other == ("openid", "launch/patient")


def test_contexts_for_mixed_contexts() -> None:
    scopes = parse_scopes("patient/Observation.rs user/Observation.r system/*.s")
    assert scopes.contexts_for(R, "Observation") == {"patient", "user"}
    assert scopes.contexts_for(S, "Observation") == {"patient", "system"}
    assert scopes.contexts_for(S, "Task") == {"system"}
    assert scopes.contexts_for(R, "Task") == frozenset()
    assert scopes.contexts_for(C, "Observation") == frozenset()


def test_query_restrictions_of_a_narrowed_grant() -> None:
    scopes = parse_scopes("patient/Observation.rs?category=laboratory")
    assert scopes.query_restrictions(R, "Observation") == [(("category", "laboratory"),)]
    assert scopes.query_restrictions(S, "Observation") == [(("category", "laboratory"),)]


def test_query_restrictions_are_alternatives() -> None:
    scopes = parse_scopes(
        "patient/Observation.rs?category=laboratory patient/Observation.rs?category=vital-signs "
        "patient/Observation.rs?category=laboratory"
    )
    assert scopes.query_restrictions(S, "Observation") == [
        (("category", "laboratory"),),
        (("category", "vital-signs"),),
    ]


@pytest.mark.parametrize(
    "scope",
    [
        "patient/Observation.rs",
        "patient/Observation.rs?category=laboratory patient/Observation.r",
        "patient/Observation.rs?category=laboratory patient/*.rs",
        "patient/Observation.rs?category=laboratory user/Observation.read",
    ],
)
def test_an_unrestricted_grant_lifts_the_restriction(scope: str) -> None:
    assert parse_scopes(scope).query_restrictions(R, "Observation") == []


def test_query_restrictions_per_context() -> None:
    scopes = parse_scopes("patient/Observation.rs user/Observation.rs?category=laboratory")
    assert scopes.query_restrictions(R, "Observation") == []
    assert scopes.query_restrictions(R, "Observation", context="patient") == []
    assert scopes.query_restrictions(R, "Observation", context="user") == [(("category", "laboratory"),)]
    with pytest.raises(ValueError, match="in context 'system'"):
        scopes.query_restrictions(R, "Observation", context="system")


def test_query_restrictions_fail_closed_when_not_granted() -> None:
    scopes = parse_scopes("patient/Observation.rs?category=laboratory")
    with pytest.raises(ValueError, match="no scope grants CREATE on Observation"):
        scopes.query_restrictions(C, "Observation")
    with pytest.raises(ValueError, match="no scope grants READ on Patient"):
        scopes.query_restrictions(R, "Patient")


@pytest.mark.parametrize(
    ("code", "interaction"),
    [
        ("read", R),
        ("vread", R),
        ("history-instance", R),
        ("search-type", S),
        ("history-type", S),
        ("create", C),
        ("update", U),
        ("patch", U),
        ("delete", D),
    ],
)
def test_interaction_from_fhir(code: str, interaction: Interaction) -> None:
    assert Interaction.from_fhir(code) is interaction


@pytest.mark.parametrize(
    "code", ["search-system", "history-system", "transaction", "batch", "operation", "READ"]
)
def test_interaction_from_fhir_refuses_cross_type_and_unknown_codes(code: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(code))):
        Interaction.from_fhir(code)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"context": "doctor"}, "context 'doctor'"),
        ({"resource_type": "observation"}, "resource_type 'observation'"),
        ({"permissions": frozenset()}, "non-empty set of Interaction"),
        ({"permissions": frozenset({"r"})}, "non-empty set of Interaction"),
        ({"query": (("category", ""),)}, "needs a name and a value"),
    ],
)
def test_resource_scope_validates_its_fields(kwargs: dict[str, object], reason: str) -> None:
    fields: dict[str, object] = {
        "context": "patient",
        "resource_type": "Observation",
        "permissions": frozenset({R}),
        **kwargs,
    }
    with pytest.raises(InvalidScope, match=re.escape(reason)):
        ResourceScope(**fields)  # type: ignore[arg-type]


def test_analyze_needs_read_on_the_study_and_create_on_the_report() -> None:
    assert requirements_for_analyze() == [(R, "ImagingStudy"), (C, "DiagnosticReport")]


@pytest.mark.parametrize(
    ("scope", "allowed"),
    [
        ("patient/ImagingStudy.rs patient/DiagnosticReport.c", True),
        ("user/ImagingStudy.read user/DiagnosticReport.write", True),
        ("system/*.cruds", True),
        ("patient/ImagingStudy.rs", False),
        ("patient/ImagingStudy.s patient/DiagnosticReport.c", False),
        ("patient/DiagnosticReport.cruds patient/Observation.c", False),
        ("openid fhirUser launch/patient", False),
    ],
)
def test_analyze_requirements_against_scopes(scope: str, allowed: bool) -> None:
    scopes = parse_scopes(scope)
    assert all(scopes.allows(i, t) for i, t in requirements_for_analyze()) is allowed


def test_scopes_default_is_empty() -> None:
    assert Scopes().granted_text == ""
    assert not Scopes().allows(R, "Patient")
