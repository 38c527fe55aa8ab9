"""Reconciliation of arrivals: a study whose identity the EHR does not confirm waits for a person.

IHE RAD Patient Information Reconciliation (PIR) lets a PACS hold images acquired under an
unknown or wrong identity until they are reconciled. For each stable study of Orthanc's change
feed (ADR 0005), before anything else is done with it, this module asks two questions (ADR 0039):

- **Unknown patient**: is the study's PatientID (+ IssuerOfPatientID) a stored Patient's
  identifier? Asked only when `reconcile.require_known_patient` is on: a site whose EHR sends
  no Patient resources would otherwise hold every study.
- **Order disagrees**: does a stored ServiceRequest with the study's AccessionNumber name another
  patient? Identity is compared as ADR 0003 maps it: the order's subject is the study's patient
  when its id is the study's DICOM Patient id, or when the Patient read under that id has an
  identifier whose inverse mapping (`identity_from_identifier`) is the study's (PatientID, issuer).

A study with a finding gets one `reconcile` Task (conditional on its identifier, the Orthanc id of
the study under that identity, so a replayed change or a second replica makes no second one) and
is *held*: it is not published to the arrival consumers (no analysis, no reading Task) until the
corrected study arrives under its reconciled identity, which is checked again like any arrival.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from fhir_facade.dicom_to_fhir.context import MappingContext
from fhir_facade.dicom_to_fhir.patient import patient_identifier, patient_resource_id
from fhir_facade.fhir.conditional_guard import ConditionalGuard, guarded
from fhir_facade.fhir.internal_search import SearchBuilder, read_or_none
from fhir_facade.fhir.narrative import Paragraph, narrative, with_narrative
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.references import local_target
from fhir_facade.intake.identity import IdentityNotDerivable, identity_from_identifier
from fhir_facade.watcher.change_feed import StudyArrived

__all__ = [
    "ISSUE_SYSTEM",
    "OPEN_STATUSES",
    "RECONCILE_CODE",
    "RECONCILE_IDENTIFIER_SYSTEM",
    "ArrivalReconciler",
    "Finding",
    "is_reconcile_task",
    "same_patient",
]

log = logging.getLogger(__name__)

TASK_CODE_SYSTEM: Final = "http://fhir-facade.org/fhir/CodeSystem/task-code"
ISSUE_SYSTEM: Final = "http://fhir-facade.org/fhir/CodeSystem/facade-issue"
RECONCILE_CODE: Final = {
    "system": TASK_CODE_SYSTEM,
    "code": "reconcile",
    "display": "Reconcile imaging study identity",
}
#: Task.identifier system of a reconcile Task; the value is Orthanc's id of the study under the
#: identity it arrived with (Orthanc hashes PatientID + StudyInstanceUID), i.e. the copy to correct.
RECONCILE_IDENTIFIER_SYSTEM: Final = "http://fhir-facade.org/fhir/NamingSystem/orthanc-study"
#: A reconcile Task in one of these is still waiting for its person (task.html#statemachine).
OPEN_STATUSES: Final = ("requested", "received", "accepted", "ready", "in-progress", "on-hold")
AWAITING: Final = "awaiting reconciliation"


@dataclass(frozen=True)
class Finding:
    """One reason a study is held: `code` in the facade-issue CodeSystem, and what it is about."""

    code: str
    display: str
    value: dict[str, Any]
    """The Task.input value element, e.g. {"valueIdentifier": ...} or {"valueReference": ...}."""


def is_reconcile_task(task: Mapping[str, Any] | None) -> bool:
    codings = ((task or {}).get("code") or {}).get("coding", [])
    return any(c.get("system") == TASK_CODE_SYSTEM and c.get("code") == "reconcile" for c in codings)


def same_patient(
    patient: Mapping[str, Any] | None,
    patient_ref_id: str | None,
    study_identity: tuple[str, str],
    ctx: MappingContext,
) -> bool:
    """Whether a Patient (read under `patient_ref_id`, or None when unreadable) is the study's
    (PatientID, issuer), issuer "" for none, as ADR 0003 maps identities both ways."""
    patient_id, issuer = study_identity
    if patient_ref_id is not None and patient_ref_id == patient_resource_id(patient_id, issuer or None):
        return True
    for identifier in (patient or {}).get("identifier") or []:
        try:
            if identity_from_identifier(identifier, ctx) == (patient_id, issuer):
                return True
        except IdentityNotDerivable:
            continue  # an identifier that is no MRN this PACS could hold (e.g. a passport number)
    return False


class ArrivalReconciler:
    """Decides whether an arrived study is held, and makes its reconcile Task (idempotent)."""

    def __init__(
        self,
        *,
        tasks: ResourceProvider,
        orders: ResourceProvider,
        patients: ResourceProvider,
        stored_patients: ResourceProvider,
        ctx: MappingContext,
        require_known_patient: bool,
        base_url: str,
    ) -> None:
        self._tasks = tasks
        self._orders = orders
        self._patients = patients
        self._stored_patients = stored_patients
        self._ctx = ctx
        self._require_known_patient = require_known_patient
        self._base_url = base_url

    async def hold(self, study: StudyArrived) -> bool:
        """True when the study waits for reconciliation (its Task exists or was made now)."""
        findings, order = await self.findings(study)
        if not findings:
            return False
        await self._ensure_task(study, findings, order)
        return True

    async def findings(self, study: StudyArrived) -> tuple[list[Finding], dict[str, Any] | None]:
        """What disagrees, and the order with the study's accession (None when not exactly one)."""
        identity = (study.patient_id or "", study.issuer_of_patient_id or "")
        findings: list[Finding] = []
        if self._require_known_patient and not await self._known_patient(identity):
            identifier = patient_identifier(identity[0], identity[1] or None, self._ctx)
            findings.append(
                Finding("unknown_patient", "Study of an unknown patient", {"valueIdentifier": identifier})
            )
        order = await self._order(study.accession_number)
        if order is not None and not await self._order_agrees(order, identity):
            findings.append(
                Finding(
                    "order_patient_mismatch",
                    "Study disagrees with its order",
                    {"valueReference": {"reference": f"ServiceRequest/{order['id']}"}},
                )
            )
        return findings, order

    async def _known_patient(self, identity: tuple[str, str]) -> bool:
        if not identity[0]:
            return False
        identifier = patient_identifier(identity[0], identity[1] or None, self._ctx)
        search = SearchBuilder(self._stored_patients, base_url=self._base_url).where_token(
            "identifier", identifier["system"], identifier["value"]
        )
        return any(same_patient(p, None, identity, self._ctx) for p in await search.count(20).matches())

    async def _order(self, accession: str | None) -> dict[str, Any] | None:
        if not accession:
            return None
        search = SearchBuilder(self._orders, base_url=self._base_url).where("identifier", accession)
        orders = await search.count(2).matches()
        if len(orders) > 1:
            log.warning("Accession %s matches several orders; not compared", accession)
        return orders[0] if len(orders) == 1 else None

    async def _order_agrees(self, order: Mapping[str, Any], identity: tuple[str, str]) -> bool:
        reference = (order.get("subject") or {}).get("reference")
        target = local_target(reference, self._base_url) if isinstance(reference, str) else None
        if target is None or target[0] != "Patient":
            return True  # no local patient to compare (a Group, an external reference): not judged
        patient = await read_or_none(self._patients, target[1])
        return same_patient(patient, target[1], identity, self._ctx)

    async def _ensure_task(
        self, study: StudyArrived, findings: list[Finding], order: dict[str, Any] | None
    ) -> None:
        existing = (
            SearchBuilder(self._tasks, base_url=self._base_url)
            .where_token("identifier", RECONCILE_IDENTIFIER_SYSTEM, study.orthanc_id)
            .where("status", ",".join(OPEN_STATUSES))
        )
        task = reconcile_task(study, findings, order)

        async def attempt(guard: ConditionalGuard) -> dict[str, Any] | None:
            with guard.searching():
                if await existing.count(1).matches():
                    return None  # already waiting (a replayed change, more instances, a replica)
            with guard.writing():
                return await self._tasks.create(task)

        created = await guarded("Task", existing.params, attempt)
        if created is not None:
            log.info(
                "Task/%s: study %s held for reconciliation (%s)",
                created["id"],
                study.study_uid,
                ", ".join(f.code for f in findings),
            )


def reconcile_task(
    study: StudyArrived, findings: list[Finding], order: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The reconcile Task of a held study (pure)."""
    task: dict[str, Any] = {
        "resourceType": "Task",
        "identifier": [{"system": RECONCILE_IDENTIFIER_SYSTEM, "value": study.orthanc_id}],
        "status": "requested",
        "businessStatus": {"text": AWAITING},
        "intent": "order",
        "code": {"coding": [dict(RECONCILE_CODE)]},
        "focus": {"reference": f"ImagingStudy/{study.study_uid}"},
        "authoredOn": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "description": (
            f"Reconcile study {study.study_uid} (PatientID {study.patient_id or '(none)'}, "
            f"accession {study.accession_number or '(none)'}): "
            + "; ".join(f.display.lower() for f in findings)
        ),
        "input": [
            {"type": {"coding": [{"system": ISSUE_SYSTEM, "code": f.code, "display": f.display}]}, **f.value}
            for f in findings
        ],
    }
    patient_id = (
        patient_resource_id(study.patient_id, study.issuer_of_patient_id) if study.patient_id else None
    )
    if patient_id:
        task["for"] = {"reference": f"Patient/{patient_id}"}
    if order is not None:
        task["basedOn"] = [{"reference": f"ServiceRequest/{order['id']}"}]
    return with_narrative(task, narrative(Paragraph(task["description"], label="Reconciliation:")))
