"""Authorization of the facade's own operations: `$analyze` and its jobs, and the sync administration.

Resource interactions are checked by the authorizing providers; these routes act on several types at
once or on the server itself, so each names what it needs here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request

from fhir_facade.auth.access import authenticated_caller
from fhir_facade.auth.compartment import compartment_rule, patient_references
from fhir_facade.auth.errors import forbidden
from fhir_facade.auth.scopes import Interaction, requirements_for_analyze
from fhir_facade.fhir.errors import FhirError, not_found
from fhir_facade.fhir.provider import ResourceProvider

__all__ = ["analyze_guard", "check_analysis_rights", "server_admin_guard"]

Guard = Callable[[Request], Awaitable[None]]


def analyze_guard(studies: ResourceProvider, tasks: ResourceProvider, base_url: str) -> Guard:
    """`POST ImagingStudy/{id}/$analyze` needs read on the study (and the study must be within the
    token's patient compartment: it is read through the authorizing provider, so another patient's
    study is a 404) and create on DiagnosticReport. Polling a job needs read on DiagnosticReport,
    cancelling one create on DiagnosticReport; under a `patient/` grant the job must be the patient's."""

    async def guard(request: Request) -> None:
        access = authenticated_caller()
        study_id = request.path_params.get("study_id")
        if study_id is not None:
            await check_analysis_rights(studies, study_id)
        else:
            interaction = Interaction.CREATE if request.method == "DELETE" else Interaction.READ
            access.require(interaction, "DiagnosticReport")
            patients = access.confinement(interaction, "DiagnosticReport")
            if patients is not None:
                await _check_job_patient(
                    tasks, base_url, str(request.path_params.get("task_id", "")), patients
                )

    return guard


async def check_analysis_rights(studies: ResourceProvider, study_id: str) -> None:
    """What running `$analyze` on a study needs of the current caller: read on the study (read through
    the authorizing provider `studies`, so another patient's study is a 404) and create on
    DiagnosticReport. The HTTP operation checks it per request; the analysis worklist checks it when
    it runs a Task, with the rights of the client that requested the Task."""
    access = authenticated_caller()
    for interaction, resource_type in requirements_for_analyze():
        access.require(interaction, resource_type)
    if access.enforced:
        await studies.read(study_id)


async def _check_job_patient(
    tasks: ResourceProvider, base_url: str, task_id: str, patients: frozenset[str]
) -> None:
    """A job is its Task, which the jobs endpoint reads on the server's own authority: a confined caller
    may poll or cancel only a job `for` one of its patients (else 404, like another patient's report).
    The report itself is read through the authorizing provider as well (AnalysisJobs.state), so a job
    Task whose output names another patient's report hands out nothing. `tasks` is the unwrapped Task
    provider: the job's Task is the server's, whatever the caller's Task scopes."""
    rule = compartment_rule("Task")
    assert rule is not None
    try:
        task = await tasks.read(task_id)
    except FhirError as error:
        if error.status in (404, 410):
            raise not_found(f"No analysis job {task_id}") from error
        raise
    if patients.isdisjoint(patient_references(task, rule, base_url)):
        raise not_found(f"No analysis job {task_id}")


def server_admin_guard() -> Guard:
    """Sync status and replay concern every stored resource of every patient: they need a `user/` or
    `system/` scope on all types (`*`): read for GET, update for POST."""

    async def guard(request: Request) -> None:
        access = authenticated_caller()
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
