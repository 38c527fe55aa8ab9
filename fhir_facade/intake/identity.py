"""The identity a study should carry, read from the EHR's Patient and order (FHIR side of coercion).

The inverse of the DICOM view of Patient (ADR 0003): an MRN Identifier's system gives the
IssuerOfPatientID, its value the PatientID; name, birth date and sex come from the Patient as the
worklist item takes them (so a study imported under an order says what the modality would have
been told), and the AccessionNumber from the order's ACSN identifier.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fhir_facade.dicom_to_fhir.context import MappingContext
from fhir_facade.dicom_to_fhir.patient import identifier_system_to_issuer
from fhir_facade.intake.coercion import IdentityTarget
from fhir_facade.worklist.mwl_item import (
    dicom_patient_sex,
    fhir_birth_date_as_da,
    order_accession_number,
    pn_from_human_names,
)

__all__ = ["IdentityNotDerivable", "identity_from_fhir", "identity_from_identifier"]

_V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
_LO_MAX = 64
_SH_MAX = 16


class IdentityNotDerivable(ValueError):
    """The Patient (or identifier) gives no PatientID this PACS can hold.

    `expression` names the FHIR element, for OperationOutcome.issue.expression with a 422.
    """

    def __init__(self, message: str, expression: str) -> None:
        super().__init__(f"{expression}: {message}")
        self.expression = expression


def identity_from_identifier(
    identifier: Mapping[str, Any], ctx: MappingContext, *, expression: str = "identifier"
) -> tuple[str, str]:
    """(PatientID, IssuerOfPatientID) for an MRN Identifier; "" issuer means "none".

    The site's own MRN system means no issuer, unless `assigner.display` names a local issuer (how
    ADR 0003 writes an unmappable one); a mapped, OID or URI system gives its issuer.
    """
    value = str(identifier.get("value") or "")
    system = str(identifier.get("system") or "")
    if not value:
        raise IdentityNotDerivable("the identifier has no value", f"{expression}.value")
    if len(value) > _LO_MAX or "\\" in value:
        raise IdentityNotDerivable(
            "PatientID is LO: at most 64 characters, no backslash", f"{expression}.value"
        )
    if not system:
        raise IdentityNotDerivable("the identifier has no system (whose MRN is it?)", f"{expression}.system")
    known, issuer = identifier_system_to_issuer(system, ctx)
    if not known:
        raise IdentityNotDerivable(f"system {system!r} is not a URI", f"{expression}.system")
    if issuer is None:
        issuer = str((identifier.get("assigner") or {}).get("display") or "")
    return value, issuer[:_LO_MAX]


def _mrn_identifier(patient: Mapping[str, Any], ctx: MappingContext) -> tuple[int, Mapping[str, Any]]:
    """The Patient's MRN: an identifier typed v2-0203 MR first, then one in the site's own system."""
    candidates = [
        (index, i)
        for index, i in enumerate(patient.get("identifier") or [])
        if i.get("value") and i.get("system")
    ]

    def rank(entry: tuple[int, Mapping[str, Any]]) -> int:
        identifier = entry[1]
        typed_mr = any(
            c.get("system") == _V2_0203 and c.get("code") == "MR"
            for c in (identifier.get("type") or {}).get("coding", [])
        )
        own_system = identifier.get("system") == ctx.patient_identifier_system
        return 0 if typed_mr else 1 if own_system else 2

    if not candidates:
        raise IdentityNotDerivable(
            "the Patient has no identifier with a system and value", "Patient.identifier"
        )
    return min(candidates, key=rank)


def identity_from_fhir(
    patient: Mapping[str, Any], order: Mapping[str, Any] | None, ctx: MappingContext
) -> IdentityTarget:
    """The identity `patient` (and `order`, when given) says a study should carry.

    Name, birth date and sex are set only when the Patient states them (an EHR that does not know a
    birth date does not erase the one the modality recorded); gender "unknown" empties PatientSex.
    """
    index, identifier = _mrn_identifier(patient, ctx)
    patient_id, issuer = identity_from_identifier(identifier, ctx, expression=f"Patient.identifier[{index}]")
    name = pn_from_human_names(patient.get("name") or [])
    birth_date = fhir_birth_date_as_da(patient.get("birthDate"))
    gender = patient.get("gender")
    accession = order_accession_number(order) if order is not None else ""
    if len(accession) > _SH_MAX:
        raise IdentityNotDerivable(
            "AccessionNumber is SH: at most 16 characters", "ServiceRequest.identifier"
        )
    return IdentityTarget(
        patient_id=patient_id,
        issuer_of_patient_id=issuer,
        patient_name=name or None,
        patient_birth_date=birth_date or None,
        patient_sex=dicom_patient_sex(gender) if gender else None,
        accession_number=accession or None,
    )
