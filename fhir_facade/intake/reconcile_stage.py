"""Resolving a reconcile Task corrects its study in the PACS (ADR 0039), as a pipeline stage after
the authorization: it applies to a PUT, a Bundle entry or any other way the Task is completed.

A person completes the Task (in-progress -> completed, the R4 state machine) with an `output`
whose valueReference names the Patient the study belongs to (a stored Patient, a DICOM-view
Patient id, or `{"type": "Patient", "identifier": MRN}`) and, optionally, one naming the
ServiceRequest. Before the Task is stored, the stage
- reads that Patient and order with the caller's rights (the authorization stage, ADR 0009),
- requires the caller to be allowed to write the target Patient (`u` on Patient, and the patient
  within its compartments): re-filing images under a patient changes that patient's record,
- derives the identity (intake/identity.py) and corrects the Orthanc study the Task names
  (reconcile_pacs.py, reason CORRECT), then records an AuditEvent.
Only then does the Task commit, completed, with `businessStatus` and an output saying what was
done. A failure leaves the Task as it was (the PACS error's 503, or a 422 naming the element); the
correction is idempotent, so completing the Task again finishes what a crash left.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from fhir_facade.audit.event import audit_event_narrative
from fhir_facade.audit.interaction import DCM
from fhir_facade.audit.recorder import AuditRecorder
from fhir_facade.auth.access import current_access
from fhir_facade.auth.errors import forbidden
from fhir_facade.auth.scopes import Interaction
from fhir_facade.dicom_to_fhir.context import MappingContext
from fhir_facade.dicom_to_fhir.patient import patient_resource_id
from fhir_facade.fhir.errors import FhirError, error, unprocessable
from fhir_facade.fhir.internal_search import read_or_none
from fhir_facade.fhir.narrative import with_narrative
from fhir_facade.fhir.pipeline import Call, InteractionContext, Proceed, Update
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.references import local_target
from fhir_facade.intake.identity import IdentityNotDerivable, identity_from_fhir, identity_from_identifier
from fhir_facade.intake.reconcile import RECONCILE_IDENTIFIER_SYSTEM, is_reconcile_task
from fhir_facade.intake.reconcile_pacs import Correction, StudyCorrector

__all__ = ["ReconcileStage", "reconcile_audit_event"]

log = logging.getLogger(__name__)

#: PS3.15 A.5 / PS3.16 CID 400: a study re-filed under a patient changes the patient's record.
_PATIENT_RECORD: Final = {"system": DCM, "code": "110110", "display": "Patient Record"}
_SUBTYPE: Final = {
    "system": "http://fhir-facade.org/fhir/CodeSystem/task-code",
    "code": "reconcile",
    "display": "Reconcile imaging study identity",
}
_OBJECT_ROLE: Final = "http://terminology.hl7.org/CodeSystem/object-role"
_ENTITY_TYPE: Final = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_CORRECTED: Final = "corrected in the PACS"


def _targets(task: Mapping[str, Any], base_url: str) -> tuple[int, dict[str, Any]] | None:
    """(index, valueReference) of the output naming a Patient; None when there is none."""
    for index, output in enumerate(task.get("output") or []):
        value = output.get("valueReference") or {}
        reference = value.get("reference")
        target = local_target(reference, base_url) if isinstance(reference, str) else None
        if (target is not None and target[0] == "Patient") or (
            reference is None and value.get("type") == "Patient" and value.get("identifier")
        ):
            return index, value
    return None


def _order_reference(task: Mapping[str, Any], base_url: str) -> tuple[int, str] | None:
    for index, output in enumerate(task.get("output") or []):
        reference = (output.get("valueReference") or {}).get("reference")
        target = local_target(reference, base_url) if isinstance(reference, str) else None
        if target is not None and target[0] == "ServiceRequest":
            return index, target[1]
    return None


def _orthanc_study(task: Mapping[str, Any]) -> str | None:
    for identifier in task.get("identifier") or []:
        if identifier.get("system") == RECONCILE_IDENTIFIER_SYSTEM and identifier.get("value"):
            return str(identifier["value"])
    return None


class ReconcileStage:
    """A pipeline stage; put it after the authorization stage. `bind` hands it the pipelined
    providers (they exist only once the pipeline does)."""

    def __init__(
        self,
        corrector: StudyCorrector,
        ctx: MappingContext,
        base_url: str,
        recorder: AuditRecorder | None,
    ) -> None:
        self._corrector = corrector
        self._ctx = ctx
        self._base_url = base_url
        self._recorder = recorder
        self._visible: Mapping[str, ResourceProvider] = {}

    def bind(self, visible: Mapping[str, ResourceProvider]) -> None:
        self._visible = visible

    async def around(self, context: InteractionContext, call: Call, proceed: Proceed) -> Any:
        if (
            isinstance(call, Update)
            and context.resource_type == "Task"
            and call.resource.get("status") == "completed"
            and is_reconcile_task(call.resource)
        ):
            current = await call.current()
            if current is not None and is_reconcile_task(current) and current.get("status") != "completed":
                await self._resolve(context, call)
        return await proceed()

    async def _resolve(self, context: InteractionContext, call: Update) -> None:
        task = call.resource
        named = _targets(task, self._base_url)
        if named is None:
            raise unprocessable(
                "A reconcile Task is completed with an output whose valueReference names the Patient "
                "the study belongs to (ADR 0039)",
                detail_code="reconcile_patient_missing",
                code="required",
            )
        index, value = named
        patient, patient_ref_id = await self._patient(value, f"Task.output[{index}].valueReference")
        order = await self._order(task)
        self._check_patient_write(patient_ref_id)
        try:
            target = identity_from_fhir(patient, order, self._ctx)
        except IdentityNotDerivable as exc:
            raise _identity_error(exc) from exc
        study_id = _orthanc_study(task)
        if study_id is None:
            raise unprocessable(
                f"Task.identifier holds no {RECONCILE_IDENTIFIER_SYSTEM} value: the facade did not "
                "make this reconcile Task, so it does not know which copy of the study to correct",
                detail_code="reconcile_patient_missing",
                code="invariant",
            )
        source = f"Task/{call.id}"
        done = await self._corrector.correct(study_id, target, source=source)
        log.info(
            "Task/%s: study %s corrected (%d instances, %s) by %s",
            call.id,
            study_id,
            done.corrected,
            ", ".join(done.changed_keywords) or "nothing to change",
            context.caller.who if context.caller else "the server",
        )
        task["businessStatus"] = {"text": _CORRECTED}
        task["output"] = [
            *(task.get("output") or []),
            {"type": {"text": "corrected instances"}, "valueInteger": done.corrected},
        ]
        if self._recorder is not None:
            await self._recorder.record(
                reconcile_audit_event(task, call.id or "", patient_ref_id, done, context, datetime.now(UTC))
            )

    async def _patient(self, value: Mapping[str, Any], expression: str) -> tuple[dict[str, Any], str | None]:
        """The named Patient (read with the caller's rights) and its id, or a Patient made of the
        named MRN identifier alone (its id the DICOM view's, ADR 0003)."""
        reference = value.get("reference")
        if isinstance(reference, str):
            target = local_target(reference, self._base_url)
            assert target is not None  # _targets checked it
            patient = await read_or_none(self._visible["Patient"], target[1])
            if patient is None:
                raise unprocessable(
                    f"{expression} refers to Patient/{target[1]}, which is not known",
                    detail_code="unknown_reference",
                )
            return patient, target[1]
        identifier = value["identifier"]
        try:
            patient_id, issuer = identity_from_identifier(
                identifier, self._ctx, expression=f"{expression}.identifier"
            )
        except IdentityNotDerivable as exc:
            raise _identity_error(exc) from exc
        return {"resourceType": "Patient", "identifier": [dict(identifier)]}, patient_resource_id(
            patient_id, issuer or None
        )

    async def _order(self, task: Mapping[str, Any]) -> dict[str, Any] | None:
        named = _order_reference(task, self._base_url)
        if named is None:
            return None
        index, order_id = named
        order = await read_or_none(self._visible["ServiceRequest"], order_id)
        if order is None:
            raise unprocessable(
                f"Task.output[{index}].valueReference refers to ServiceRequest/{order_id}, "
                "which is not known",
                detail_code="unknown_reference",
            )
        return order

    def _check_patient_write(self, patient_ref_id: str | None) -> None:
        """Re-filing a study under a patient writes to that patient's record: the caller needs `u` on
        Patient, within its compartments (ADR 0009's rule for an update of that Patient)."""
        access = current_access.get()
        if access is None or not access.enforced:
            return
        access.require(Interaction.UPDATE, "Patient")
        patients = access.confinement(Interaction.UPDATE, "Patient")
        if patients is not None and patient_ref_id not in patients:
            raise forbidden("A reconciliation re-files the study under a patient this token may not write")


def _identity_error(exc: IdentityNotDerivable) -> FhirError:
    return error(
        422, "processing", str(exc), detail_code="reconcile_identity_invalid", expression=(exc.expression,)
    )


def reconcile_audit_event(
    task: Mapping[str, Any],
    task_id: str,
    patient_ref_id: str | None,
    done: Correction,
    context: InteractionContext,
    now: datetime,
) -> dict[str, Any]:
    """The AuditEvent of one correction in the PACS (pure): who, which Task, study and patients."""

    def entity(reference: str, kind: str, kind_display: str, role: str, role_display: str) -> dict[str, Any]:
        return {
            "what": {"reference": reference},
            "type": {"system": _ENTITY_TYPE, "code": kind, "display": kind_display},
            "role": {"system": _OBJECT_ROLE, "code": role, "display": role_display},
        }

    entities = [entity(f"Task/{task_id}", "2", "System Object", "4", "Domain Resource")]
    focus = (task.get("focus") or {}).get("reference")
    if focus:
        entities.append(entity(focus, "2", "System Object", "4", "Domain Resource"))
    if patient_ref_id:
        entities.append(entity(f"Patient/{patient_ref_id}", "1", "Person", "1", "Patient"))
    previous = (task.get("for") or {}).get("reference")
    if previous and previous != f"Patient/{patient_ref_id}":
        entities.append(entity(previous, "1", "Person", "1", "Patient"))
    who = context.caller.who if context.caller is not None else "fhir-facade (the server itself)"
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": dict(_PATIENT_RECORD),
        "subtype": [dict(_SUBTYPE)],
        "action": "U",
        "recorded": now.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "outcome": "0",
        "outcomeDesc": (
            f"Study corrected in the PACS: {done.corrected} instance(s) "
            f"({', '.join(done.changed_keywords) or 'no attribute changed'}), reason CORRECT"
        ),
        "agent": [{"who": {"display": who}, "requestor": True}],
        "source": {"observer": {"display": "fhir-facade"}},
        "entity": entities,
    }
    if context.correlation_id:
        event["entity"].append(
            {
                "what": {"identifier": {"value": context.correlation_id}},
                "type": {"system": _ENTITY_TYPE, "code": "4", "display": "Other"},
                "description": "correlation id",
            }
        )
    return with_narrative(event, audit_event_narrative(event))
