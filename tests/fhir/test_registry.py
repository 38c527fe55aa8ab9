"""The resource-type registry (fhir_facade/fhir/registry.py, docs/adr/0023): its generated data is
what scripts/generate_registry.py makes from the R4 definitions (no drift), the path walker, the
derived compartment rules, and the start-up checks that keep a declared search parameter from
being silently ignored."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from fhir_facade.auth.compartment import compartment_rule
from fhir_facade.fhir.element_paths import references_at, values_at
from fhir_facade.fhir.registry import (
    RegistryError,
    UnhandledSearchParameter,
    check_search_handlers,
    load_registry,
    registry,
)
from fhir_facade.package_data import data_path
from fhir_facade.resources.imaging_study import _SEARCH_HANDLERS as STUDY_HANDLERS
from fhir_facade.resources.imaging_study import ImagingStudyProvider
from fhir_facade.resources.patient import _SEARCH_HANDLERS as PATIENT_HANDLERS
from fhir_facade.resources.patient import PatientProvider
from fhir_facade.resources.stored import PERSISTENT_TYPES
from fhir_facade.store.indexing import INDEXED_PARAMS, PRIORITY_SORTED_PARAMS, extract_index

REPO = Path(__file__).resolve().parents[2]


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("generate_registry", REPO / "scripts/generate_registry.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_files_are_what_the_script_makes() -> None:
    generator = _generator()
    if not (generator.DEFINITIONS / "search-parameters.json").exists():
        reason = f"{generator.DEFINITIONS} is missing: run scripts/setup.sh"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    search, compartment = generator.build()
    folder = data_path("capability")
    assert generator.render(search) == (folder / "search-parameters.json").read_text(encoding="utf-8")
    assert generator.render(compartment) == (folder / "compartment-patient.json").read_text(encoding="utf-8")


def test_stored_types_and_their_parameters_come_from_the_registry() -> None:
    assert "Communication" in PERSISTENT_TYPES
    assert set(INDEXED_PARAMS) == {*PERSISTENT_TYPES, "Patient"}
    observation = {p.name: p for p in INDEXED_PARAMS["Observation"]}
    assert observation["date"].paths == ("Observation.effective[x]",)
    assert observation["value-string"].paths == (
        "Observation.valueString",
        "Observation.valueCodeableConcept.text",
    )
    assert observation["patient"].resolves_to == ("Patient",)
    # request-priority codes sort by rank wherever they are bound, found from the R4 bindings
    assert {("Task", "priority"), ("ServiceRequest", "priority")} <= PRIORITY_SORTED_PARAMS


def test_indexing_walks_choices_names_and_resolve_filters() -> None:
    rows = extract_index(
        {
            "resourceType": "Communication",
            "status": "completed",
            "subject": {"reference": "Group/g1"},
            "recipient": [{"reference": "Patient/p1"}, {"reference": "Practitioner/d1"}],
            "sent": "2026-12-04",
        }
    )
    assert ("status", None, "completed") in rows.tokens
    assert ("subject", "Group", "g1", "Group/g1") in rows.references
    assert not [r for r in rows.references if r[0] == "patient"]  # Group is no Patient
    assert {r[2] for r in rows.references if r[0] == "recipient"} == {"p1", "d1"}
    names = extract_index(
        {
            "resourceType": "Patient",
            "name": [{"family": "Müller", "given": ["Anna", "B"], "text": "Anna Müller"}],
        }
    )
    assert {s[2] for s in names.strings} == {"Müller", "Anna", "B", "Anna Müller"}


def test_the_path_walker() -> None:
    observation = {
        "resourceType": "Observation",
        "effectivePeriod": {"start": "2026"},
        "performer": [{"reference": "Patient/1"}, {"display": "x"}],
        "component": [{"valueString": "a"}, {"valueString": "b"}],
    }
    assert list(values_at(observation, "Observation.effective[x]")) == [{"start": "2026"}]
    assert list(values_at(observation, "component.value[x]")) == ["a", "b"]
    assert list(values_at(observation, "Resource.id")) == []
    assert references_at(observation, ("Observation.performer", "subject")) == ["Patient/1"]


def test_compartment_rules_are_derived_from_r4() -> None:
    assert compartment_rule("Communication") == compartment_rule("Communication")
    communication = compartment_rule("Communication")
    assert communication is not None
    assert (communication.search_param, communication.elements) == ("patient", ("Communication.subject",))
    task = compartment_rule("Task")
    assert task is not None and (task.search_param, task.elements) == ("patient", ("Task.for",))
    device, provenance = compartment_rule("Device"), compartment_rule("Provenance")
    assert device is not None and device.unreferenced_is_shared  # the facade's addition
    assert provenance is not None and provenance.via_targets
    assert compartment_rule("Endpoint") is None  # not in the R4 Patient compartment
    assert compartment_rule("Patient") is not None


def _edited_registry(tmp_path: Path, edit: Any) -> Path:
    folder = tmp_path / "capability"
    shutil.copytree(data_path("capability"), folder)
    path = folder / "resource-types.json"
    declared = json.loads(path.read_text(encoding="utf-8"))
    edit(declared)
    path.write_text(json.dumps(declared), encoding="utf-8")
    return folder


def test_a_type_in_the_compartment_without_a_served_compartment_parameter_fails_loading(
    tmp_path: Path,
) -> None:
    """Granting it unconfined to patient/ scopes would leak: loading refuses instead."""

    def drop_patient(declared: dict[str, Any]) -> None:
        declared["types"]["Communication"]["search"] = ["status", "medium"]

    with pytest.raises(RegistryError, match="Communication is in the R4 Patient compartment"):
        load_registry(_edited_registry(tmp_path, drop_patient))


def test_a_declared_parameter_without_generated_data_fails_loading(tmp_path: Path) -> None:
    def add(declared: dict[str, Any]) -> None:
        declared["types"]["Communication"]["search"].append("no-such-param")

    with pytest.raises(RegistryError, match="no-such-param"):
        load_registry(_edited_registry(tmp_path, add))


def test_every_declared_virtual_parameter_has_a_handler() -> None:
    check_search_handlers("ImagingStudy", ImagingStudyProvider.search_params, STUDY_HANDLERS)
    check_search_handlers("Patient", PatientProvider.search_params, PATIENT_HANDLERS)


def test_a_declared_parameter_without_a_handler_fails_start_up(tmp_path: Path) -> None:
    """Declaring ImagingStudy `reason` (in the registry data and on the provider) without a handler:
    the check that runs at import raises."""

    def declare_reason(declared: dict[str, Any]) -> None:
        declared["types"]["ImagingStudy"]["search"].append("reason")

    folder = _edited_registry(tmp_path, declare_reason)
    generator = _generator()
    if (generator.DEFINITIONS / "search-parameters.json").exists():
        generator.DECLARATIONS = folder / "resource-types.json"
        search, _ = generator.build()
        (folder / "search-parameters.json").write_text(generator.render(search), encoding="utf-8")
    else:  # the generated entry, written by hand
        table = json.loads((folder / "search-parameters.json").read_text(encoding="utf-8"))
        table["resourceTypes"]["ImagingStudy"].append(
            {"name": "reason", "type": "token", "definition": "x", "description": "x", "paths": ["x"]}
        )
        (folder / "search-parameters.json").write_text(json.dumps(table), encoding="utf-8")
    edited = load_registry(folder)
    reason = edited["ImagingStudy"].param("reason")
    assert reason is not None
    declared = (*ImagingStudyProvider.search_params, reason.search_param_def())
    with pytest.raises(UnhandledSearchParameter, match=r"\['reason'\]"):
        check_search_handlers("ImagingStudy", declared, STUDY_HANDLERS, edited)
    # and a provider that declares what the registry does not list fails as well
    with pytest.raises(RegistryError, match="declares"):
        check_search_handlers("ImagingStudy", declared, STUDY_HANDLERS, registry())
