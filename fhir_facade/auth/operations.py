"""Authorization of the facade's own operations: `$analyze` and its jobs, and the sync administration.

Resource interactions are checked by the authorizing providers; these routes act on several types at
once or on the server itself, so each names what it needs here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request

from fhir_facade.auth.access import Access, current_access
from fhir_facade.auth.scopes import Interaction, requirements_for_analyze
from fhir_facade.fhir.errors import forbidden, unauthorized
from fhir_facade.resources.base import ResourceProvider

__all__ = ["analyze_guard", "server_admin_guard"]

Guard = Callable[[Request], Awaitable[None]]


def _caller() -> Access:
    access = current_access.get()
    if access is None:
        raise unauthorized("This request was not authenticated")
    return access


def analyze_guard(studies: ResourceProvider) -> Guard:
    """`POST ImagingStudy/{id}/$analyze` needs read on the study (and the study must be within the
    token's patient compartment: it is read through the authorizing provider, so another patient's
    study is a 404) and create on DiagnosticReport. Polling a job needs read on DiagnosticReport,
    cancelling one create on DiagnosticReport."""

    async def guard(request: Request) -> None:
        access = _caller()
        study_id = request.path_params.get("study_id")
        if study_id is not None:
            for interaction, resource_type in requirements_for_analyze():
                access.require(interaction, resource_type)
            if access.enforced:
                await studies.read(study_id)
        elif request.method == "DELETE":
            access.require(Interaction.CREATE, "DiagnosticReport")
        else:
            access.require(Interaction.READ, "DiagnosticReport")

    return guard


def server_admin_guard() -> Guard:
    """Sync status and replay concern every stored resource of every patient: they need a `user/` or
    `system/` scope on all types (`*`): read for GET, update for POST."""

    async def guard(request: Request) -> None:
        access = _caller()
        if not access.enforced:
            return
        needed = Interaction.READ if request.method == "GET" else Interaction.UPDATE
        if not any(
            scope.resource_type == "*" and scope.context != "patient" and needed in scope.permissions
            for scope in access.scopes.resources
        ):
            letter = "rs" if needed is Interaction.READ else "u"
            raise forbidden(
                f"Sync administration needs a system/ or user/ scope on all types, e.g. system/*.{letter}",
                scope=f"system/*.{letter}",
            )

    return guard
