"""Wiring of `$deidentify` (ADR 0040): built only when FACADE_DEIDENTIFY_ENABLED is set."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fastapi import APIRouter

from fhir_facade.config import Settings
from fhir_facade.dicomweb.wado import WadoClient
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.intake.deidentify import DEIDENTIFY_OPERATION, Deidentifier
from fhir_facade.intake.deidentify_endpoint import build_deidentify_router

__all__ = ["DeidentifyRuntime", "deidentify_runtime"]


@dataclass(frozen=True)
class DeidentifyRuntime:
    deidentifier: Deidentifier
    router: APIRouter
    operations: tuple[dict[str, str], ...] = (DEIDENTIFY_OPERATION,)


def deidentify_runtime(settings: Settings, visible: Sequence[ResourceProvider]) -> DeidentifyRuntime | None:
    """The operation on the pipelined providers `visible` (so its reads and its Provenance are
    authorized and audited), or None when it is off."""
    section = settings.deidentify
    if not section.enabled:
        return None
    by_type = {p.resource_type: p for p in visible}
    source = WadoClient(
        settings.dicomweb_url,
        timeout=settings.dicomweb_timeout,
        max_connections=settings.dicomweb_max_connections,
        auth=settings.pacs_auth,
    )
    deidentifier = Deidentifier(
        section, source, by_type["ImagingStudy"], by_type["Provenance"], settings.base_url
    )
    return DeidentifyRuntime(deidentifier, build_deidentify_router(deidentifier))
