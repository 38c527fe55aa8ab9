"""One interaction pipeline (docs/adr/0022-interaction-pipeline.md): typed interaction contexts,
ordered stages around every interaction, and the event bus that tells consumers after commit."""

from fhir_facade.fhir.pipeline.bus import EventBus
from fhir_facade.fhir.pipeline.calls import Call, Create, Delete, History, Read, Search, Update, Vread
from fhir_facade.fhir.pipeline.chain import Pipeline, PipelinedProvider, Proceed, Stage
from fhir_facade.fhir.pipeline.context import (
    Caller,
    InteractionContext,
    InteractionKind,
    Origin,
    current_origin,
    enter_origin,
    origin_scope,
)
from fhir_facade.fhir.pipeline.events import ChangeKind, ResourceChanged, VersionStored

__all__ = [
    "Call",
    "Caller",
    "ChangeKind",
    "Create",
    "Delete",
    "EventBus",
    "History",
    "InteractionContext",
    "InteractionKind",
    "Origin",
    "Pipeline",
    "PipelinedProvider",
    "Proceed",
    "Read",
    "ResourceChanged",
    "Search",
    "Stage",
    "Update",
    "VersionStored",
    "Vread",
    "current_origin",
    "enter_origin",
    "origin_scope",
]
