"""The DICOM view of a patient: ids, identifiers and the Patient resource (FHIR patient.html).

A DICOM patient is identified by PatientID (0010,0020) within IssuerOfPatientID (0010,0021)
(PS3.3 C.7.1.1). The FHIR id must be computable from those two values and back again, because the
facade has no table of its own: a read of Patient/<id> becomes a QIDO query.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from fhir_facade.dicom_to_fhir.attributes import DicomJson, date, person_name, string
from fhir_facade.dicom_to_fhir.context import MappingContext
from fhir_facade.dicom_to_fhir.names import human_names, name_text
from fhir_facade.fhir.ids import is_fhir_id
from fhir_facade.fhir.narrative import Facts, Paragraph, joined, narrative, with_narrative

__all__ = [
    "ENCODED_ID_PREFIX",
    "identifier_system_to_issuer",
    "parse_patient_resource_id",
    "patient_from_dicom",
    "patient_identifier",
    "patient_narrative",
    "patient_resource_id",
]

ENCODED_ID_PREFIX = "x."
"""Prefix of encoded ids; a PatientID starting with it is always encoded, so ids never collide."""

_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
_GENDER = {"M": "male", "F": "female", "O": "other"}

PATIENT_ID = "00100020"
ISSUER_OF_PATIENT_ID = "00100021"
PATIENT_NAME = "00100010"
PATIENT_BIRTH_DATE = "00100030"
PATIENT_SEX = "00100040"


def patient_resource_id(patient_id: str, issuer: str | None) -> str | None:
    """The reversible FHIR Patient id for (PatientID, IssuerOfPatientID).

    The PatientID itself when it is a valid FHIR id, has no issuer and does not start with "x.";
    otherwise "x." + unpadded lowercase base32 of UTF-8 "issuer\\patientid" (a backslash cannot
    occur inside a DICOM LO value, PS3.5 6.2). None when that exceeds the 64 characters of an id.
    """
    if not issuer and is_fhir_id(patient_id) and not patient_id.startswith(ENCODED_ID_PREFIX):
        return patient_id
    raw = f"{issuer or ''}\\{patient_id}".encode()
    encoded = ENCODED_ID_PREFIX + base64.b32encode(raw).decode("ascii").rstrip("=").lower()
    return encoded if len(encoded) <= 64 else None


def parse_patient_resource_id(resource_id: str) -> tuple[str, str | None]:
    """The inverse of patient_resource_id: (PatientID, issuer or None); ValueError if malformed."""
    if not is_fhir_id(resource_id):
        raise ValueError(f"resource_id {resource_id!r} is not a FHIR id")
    if not resource_id.startswith(ENCODED_ID_PREFIX):
        return resource_id, None
    body = resource_id[len(ENCODED_ID_PREFIX) :]
    try:
        raw = base64.b32decode(body.upper() + "=" * (-len(body) % 8))
        issuer, separator, patient_id = raw.decode("utf-8").partition("\\")
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"resource_id {resource_id!r} is not a valid encoded patient id") from exc
    if not separator or not patient_id:
        raise ValueError(f"resource_id {resource_id!r} does not encode issuer\\patientid")
    result = (patient_id, issuer or None)
    if patient_resource_id(*result) != resource_id:  # one patient, one id
        raise ValueError(f"resource_id {resource_id!r} is not in canonical form")
    return result


def _issuer_system(issuer: str, ctx: MappingContext) -> tuple[str, bool]:
    """(Identifier.system, whether the issuer must be named in assigner)."""
    mapped = ctx.issuer_systems.get(issuer)
    if mapped:
        return mapped, False
    if _OID.fullmatch(issuer):
        return f"urn:oid:{issuer}", False
    if ":" in issuer:
        return issuer, False
    return ctx.patient_identifier_system, True


def patient_identifier(patient_id: str, issuer: str | None, ctx: MappingContext) -> dict[str, Any]:
    """The MR Identifier of PatientID within its issuer (v2-0203 "MR", datatypes.html#Identifier).

    system: the configured system for a mapped issuer; an OID issuer as urn:oid:; a URI issuer as
    itself; an unmappable local issuer falls back to patient_identifier_system and is named in
    assigner.display; no issuer gives patient_identifier_system.
    """
    identifier: dict[str, Any] = {
        "use": "usual",
        "type": {"coding": [{"system": _V2_0203, "code": "MR", "display": "Medical record number"}]},
    }
    if issuer:
        system, name_assigner = _issuer_system(issuer, ctx)
        identifier["system"] = system
        identifier["value"] = patient_id
        if name_assigner:
            identifier["assigner"] = {"display": issuer}
    else:
        identifier["system"] = ctx.patient_identifier_system
        identifier["value"] = patient_id
    return identifier


def identifier_system_to_issuer(system: str, ctx: MappingContext) -> tuple[bool, str | None]:
    """Reverse of patient_identifier's system, for `identifier=system|value` searches.

    Returns (known, issuer): issuer None means "no issuer constraint" (the default system covers
    both no issuer and unmappable local issuers). "urn:oid:X" is read as OID issuer X, although a
    literal issuer "urn:oid:X" maps to the same system. Any other absolute URI may be an issuer
    itself. A system that is not a URI is unknown: (False, None).
    """
    for issuer, mapped in ctx.issuer_systems.items():
        if mapped == system:
            return True, issuer
    if system == ctx.patient_identifier_system:
        return True, None
    if system.startswith("urn:oid:") and _OID.fullmatch(system[len("urn:oid:") :]):
        return True, system[len("urn:oid:") :]
    if ":" in system:
        return True, system
    return False, None


def patient_from_dicom(ds: DicomJson, ctx: MappingContext) -> dict[str, Any] | None:
    """A Patient from the patient attributes of a QIDO result (PS3.3 C.7.1.1); None without ID.

    gender: PatientSex M/F/O -> male/female/other; empty or anything else is left out rather than
    claimed "unknown", since DICOM has no explicit unknown value. The id is left out when the
    encoded form would exceed 64 characters (the Patient can then only be found by identifier).
    """
    patient_id = string(ds, PATIENT_ID)
    if patient_id is None:
        return None
    issuer = string(ds, ISSUER_OF_PATIENT_ID)
    patient: dict[str, Any] = {"resourceType": "Patient"}
    resource_id = patient_resource_id(patient_id, issuer)
    if resource_id is not None:
        patient["id"] = resource_id
    patient["identifier"] = [patient_identifier(patient_id, issuer, ctx)]
    names = human_names(person_name(ds, PATIENT_NAME))
    if names:
        patient["name"] = names
    gender = _GENDER.get((string(ds, PATIENT_SEX) or "").upper())
    if gender:
        patient["gender"] = gender
    birth_date = date(ds, PATIENT_BIRTH_DATE)
    if birth_date:
        patient["birthDate"] = birth_date
    return with_narrative(patient, patient_narrative(patient, name_text(person_name(ds, PATIENT_NAME))))


def patient_narrative(patient: dict[str, Any], name: str | None) -> dict[str, str]:
    """Name, id, birth date and sex (R4 narrative.html), as the PACS records them."""
    ids = joined(
        f"{i.get('value')}" + (f" ({i['assigner']['display']})" if i.get("assigner") else "")
        for i in patient.get("identifier", [])
    )
    return narrative(
        Paragraph(f"{name or 'Unnamed patient'}, as recorded in the PACS (DICOM)."),
        Facts(
            [
                ("Name", name),
                ("Patient ID", ids),
                ("Birth date", patient.get("birthDate")),
                ("Sex", patient.get("gender")),
            ]
        ),
    )
