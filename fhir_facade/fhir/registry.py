"""One registry of resource-type facts: what the facade serves of each FHIR type, and how.

Loaded from three files in capability/ (docs/adr/0023-resource-type-registry.md):
- `resource-types.json` (hand-kept): the served types, stored (the SQL store) or virtual (computed
  from the PACS), the R4 search parameters each serves, and the facade's own additions;
- `search-parameters.json` (generated from the R4 SearchParameter definitions by
  scripts/generate_registry.py): per parameter its type, walkable paths, targets, description;
- `compartment-patient.json` (generated from the R4 Patient CompartmentDefinition).

Everything per-type the store's indexing, patient confinement (auth/compartment.py), the stored
providers (their `_include` paths) and the virtual providers' search handlers need comes from
here, so a new stored type is a declaration plus regenerated data: no code table to extend.

`_include`/`_revinclude` follow every reference parameter that may name a type served here (R4
targets; Reference(Any) included), unless the declaration lists `include` itself.

The patient-compartment rule of a type (`PatientCompartment`) is derived, in this order:
the facade's addition for the type if any; Patient itself by `_id`; a type that R4 puts in the
compartment by parameters is confined by its served `patient` parameter (R4 defines `patient` as
the compartment reference restricted to Patients: `subject.where(resolve() is Patient)`), else by
the one served compartment parameter. A type R4 puts in the compartment by parameters of which
the facade serves none fails loading: granting it unconfined to `patient/` scopes would leak.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from fhir_facade.fhir.search import SearchParamDef, SearchParamType
from fhir_facade.package_data import data_path

__all__ = [
    "PatientCompartment",
    "RegistryError",
    "ResourceTypeFacts",
    "ResourceTypeRegistry",
    "SearchParameterFacts",
    "UnhandledSearchParameter",
    "check_search_handlers",
    "load_registry",
    "registry",
]


class RegistryError(RuntimeError):
    """The registry's data contradicts itself or R4 (raised at start-up, never during a request)."""


class UnhandledSearchParameter(RegistryError):
    """A virtual type declares a search parameter its provider has no handler for: it would be
    accepted and silently ignored (every search on it would match everything)."""


@dataclass(frozen=True)
class SearchParameterFacts:
    """One R4 search parameter of one type, as the facade serves it."""

    resource_type: str
    name: str
    type: SearchParamType
    #: Element paths (fhir/element_paths.py) whose values the parameter matches.
    paths: tuple[str, ...]
    description: str
    #: The SearchParameter's canonical URL (CapabilityStatement.rest.resource.searchParam.definition).
    definition: str
    expression: str = ""
    #: Only references to these types count (`.where(resolve() is T)`); () = any reference.
    resolves_to: tuple[str, ...] = ()
    #: R4 target types of a reference parameter; () = Reference(Any).
    targets: tuple[str, ...] = ()

    def search_param_def(self) -> SearchParamDef:
        """The parser's view (search.html#modifiers): `:exact`/`:contains` on strings, the target
        types as modifiers on references."""
        modifiers: frozenset[str] = frozenset()
        if self.type is SearchParamType.STRING:
            modifiers = frozenset({"exact", "contains"})
        elif self.type is SearchParamType.REFERENCE:
            modifiers = frozenset(self.targets)
        return SearchParamDef(
            self.name,
            self.type,
            self.description,
            definition=self.definition,
            modifiers=modifiers,
            target_types=self.targets,
        )


@dataclass(frozen=True)
class PatientCompartment:
    """How one type relates to the Patient compartment (compartmentdefinition-patient.html)."""

    #: Search parameter (Reference to Patient, or `_id` for Patient itself) added to confined searches;
    #: None: the type has none here, so results are filtered after the search.
    search_param: str | None
    #: Element paths whose Reference values place a resource in a patient's compartment.
    elements: tuple[str, ...] = ()
    #: A resource of this type with no reference at `elements` holds no patient data (e.g. an
    #: algorithm Device) rather than being outside every compartment.
    unreferenced_is_shared: bool = False
    #: Membership follows the targets (Provenance: it is about the resources it targets).
    via_targets: bool = False


@dataclass(frozen=True)
class ResourceTypeFacts:
    """Everything the facade knows about serving one resource type."""

    resource_type: str
    #: Kept in the SQL store with full versioning (resources/stored.py).
    stored: bool
    #: Computed from the PACS on every request (resources/imaging_study.py, patient.py, endpoint.py).
    virtual: bool
    #: A virtual type whose client-written records are stored as well (Patient, ADR 0001).
    stored_records: bool
    search_params: tuple[SearchParameterFacts, ...]
    patient_compartment: PatientCompartment | None
    #: The R4 Patient compartment's parameters for the type, as R4 lists them.
    r4_compartment_params: tuple[str, ...] = ()
    #: The reference parameters `_include`/`_revinclude` follow (see `load_registry`).
    include_params: tuple[str, ...] = ()
    #: Whether the upstream sync sends this type (False: Subscription, a delivery contract with
    #: this server only; docs/adr/0026-subscriptions-design.md).
    synced: bool = True
    #: Whether only the resource's author (and system/ callers) may see it (auth/author_only.py):
    #: a Subscription carries its receiver's address and secrets.
    author_only: bool = False
    _by_name: dict[str, SearchParameterFacts] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name.update({p.name: p for p in self.search_params})

    @property
    def indexed(self) -> bool:
        """Whether the store indexes resources of this type (stored, or stored records)."""
        return self.stored or self.stored_records

    def param(self, name: str) -> SearchParameterFacts | None:
        return self._by_name.get(name)

    @property
    def search_param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.search_params)

    @property
    def include_paths(self) -> dict[str, tuple[str, ...]]:
        """`_include`/`_revinclude` paths (search.html#include), by parameter."""
        return {name: self._by_name[name].paths for name in self.include_params}


@dataclass(frozen=True)
class ResourceTypeRegistry:
    """The facts of every served type, by type name."""

    types: Mapping[str, ResourceTypeFacts]

    def facts(self, resource_type: str) -> ResourceTypeFacts | None:
        return self.types.get(resource_type)

    def __getitem__(self, resource_type: str) -> ResourceTypeFacts:
        return self.types[resource_type]

    @property
    def stored_types(self) -> tuple[str, ...]:
        """The types kept only in the store, in declaration order."""
        return tuple(t for t, f in self.types.items() if f.stored)

    @property
    def indexed_types(self) -> tuple[str, ...]:
        return tuple(t for t, f in self.types.items() if f.indexed)

    def patient_compartment(self, resource_type: str) -> PatientCompartment | None:
        facts = self.types.get(resource_type)
        return facts.patient_compartment if facts else None


def _parameter(resource_type: str, entry: Mapping[str, Any]) -> SearchParameterFacts:
    return SearchParameterFacts(
        resource_type=resource_type,
        name=entry["name"],
        type=SearchParamType(entry["type"]),
        paths=tuple(entry["paths"]),
        description=entry["description"],
        definition=entry["definition"],
        expression=entry.get("expression", ""),
        resolves_to=tuple(entry.get("resolvesTo", ())),
        targets=tuple(entry.get("targets", ())),
    )


def _compartment(
    resource_type: str,
    params: Mapping[str, SearchParameterFacts],
    r4_params: tuple[str, ...] | None,
    addition: Mapping[str, Any] | None,
) -> PatientCompartment | None:
    if addition is not None:
        return PatientCompartment(
            addition.get("searchParam"),
            tuple(addition.get("elements", ())),
            unreferenced_is_shared=bool(addition.get("unreferencedIsShared", False)),
            via_targets=bool(addition.get("viaTargets", False)),
        )
    if resource_type == "Patient":
        return PatientCompartment("_id")
    if not r4_params:
        return None
    patient = params.get("patient")
    if patient is not None and patient.type is SearchParamType.REFERENCE and "Patient" in patient.resolves_to:
        return PatientCompartment("patient", patient.paths)
    served = [params[name] for name in r4_params if name in params]
    if len(served) == 1:
        return PatientCompartment(served[0].name, served[0].paths)
    raise RegistryError(
        f"{resource_type} is in the R4 Patient compartment by {list(r4_params)}, but the facade serves "
        f"{'several' if served else 'none'} of them and no `patient`: declare its rule in "
        "resource-types.json facadeAdditions.patientCompartment"
    )


def load_registry(folder: Path) -> ResourceTypeRegistry:
    """The registry from the three files in `folder` (capability/)."""
    declared = json.loads((folder / "resource-types.json").read_text(encoding="utf-8"))
    generated = json.loads((folder / "search-parameters.json").read_text(encoding="utf-8"))["resourceTypes"]
    compartment = json.loads((folder / "compartment-patient.json").read_text(encoding="utf-8"))[
        "resourceTypes"
    ]
    additions = declared.get("facadeAdditions", {})
    extra = additions.get("searchParameters", {})
    rules = additions.get("patientCompartment", {})
    types: dict[str, ResourceTypeFacts] = {}
    for resource_type, declaration in declared["types"].items():
        entries = {e["name"]: e for e in generated.get(resource_type, [])}
        missing = [n for n in declaration["search"] if n not in entries]
        if missing:
            raise RegistryError(
                f"{resource_type}: {missing} not in search-parameters.json: run generate_registry.py"
            )
        params = tuple(_parameter(resource_type, entries[n]) for n in declaration["search"])
        params += tuple(_parameter(resource_type, e) for e in extra.get(resource_type, []))
        by_name = {p.name: p for p in params}
        include = declaration.get("include")
        if include is None:  # every reference parameter that can name a type served here
            include = [
                p.name
                for p in params
                if p.type is SearchParamType.REFERENCE
                and (not p.targets or set(p.targets) & declared["types"].keys())
            ]
        elif not all(n in by_name and by_name[n].type is SearchParamType.REFERENCE for n in include):
            raise RegistryError(
                f"{resource_type}: include {include} names a parameter that is not a served reference"
            )
        r4 = compartment.get(resource_type)
        r4_params = tuple(r4) if r4 is not None else None
        types[resource_type] = ResourceTypeFacts(
            resource_type=resource_type,
            stored=bool(declaration.get("stored", False)),
            virtual=bool(declaration.get("virtual", False)),
            stored_records=bool(declaration.get("storedRecords", False)),
            search_params=params,
            patient_compartment=_compartment(resource_type, by_name, r4_params, rules.get(resource_type)),
            r4_compartment_params=r4_params or (),
            include_params=tuple(include),
            synced=bool(declaration.get("synced", True)),
            author_only=declaration.get("visibleTo") == "author",
        )
    return ResourceTypeRegistry(types)


@cache
def registry() -> ResourceTypeRegistry:
    """The registry of the shipped data (loaded once)."""
    return load_registry(data_path("capability"))


def check_search_handlers(
    resource_type: str,
    declared: Iterable[SearchParamDef],
    handlers: Mapping[str, Callable[..., Any]],
    facts: ResourceTypeRegistry | None = None,
) -> None:
    """Fail start-up unless a virtual type's provider declares exactly the search parameters the
    registry lists for it and has a handler for each: a declared parameter without a handler would
    be accepted and silently ignored (search.html: a server must not ignore a parameter it lists).
    """
    known = (facts or registry()).facts(resource_type)
    if known is None:
        raise RegistryError(f"{resource_type} is not in capability/resource-types.json")
    names = [p.name for p in declared]
    if sorted(names) != sorted(known.search_param_names):
        raise RegistryError(
            f"{resource_type} declares {sorted(names)}, the registry lists {sorted(known.search_param_names)}"
        )
    unhandled = sorted(set(names) - set(handlers))
    if unhandled:
        raise UnhandledSearchParameter(f"{resource_type} declares {unhandled} without a search handler")
    unknown = sorted(set(handlers) - set(names))
    if unknown:
        raise RegistryError(f"{resource_type} has handlers for undeclared parameters {unknown}")
