"""QIDO-RS study/series/instance results -> FHIR R4 ImagingStudy (imagingstudy.html).

The element mapping follows the DICOMcast convention and the R4 ImagingStudy mapping tables
(imagingstudy-mappings.html#dicom); every element that would be empty is left out, because FHIR
forbids empty strings, arrays and objects (json.html).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from fhir_facade.dicom_to_fhir.attributes import (
    DicomJson,
    first_value,
    integer,
    person_name,
    string,
    strings,
)
from fhir_facade.dicom_to_fhir.context import WADO_ENDPOINT_ID, MappingContext
from fhir_facade.dicom_to_fhir.datetimes import fhir_datetime
from fhir_facade.dicom_to_fhir.names import name_text
from fhir_facade.dicom_to_fhir.patient import (
    ISSUER_OF_PATIENT_ID,
    PATIENT_ID,
    PATIENT_NAME,
    patient_identifier,
    patient_resource_id,
)
from fhir_facade.dicom_to_fhir.terminology import body_site_coding, laterality_coding
from fhir_facade.dicom_to_fhir.uids import uid_identifier
from fhir_facade.fhir.ids import is_fhir_id
from fhir_facade.fhir.narrative import (
    Facts,
    Paragraph,
    Table,
    joined,
    narrative,
    reference_text,
    with_narrative,
)

__all__ = ["imaging_study_from_dicom", "imaging_study_narrative"]

DCM = "http://dicom.nema.org/resources/ontology/DCM"
"""Code system of DICOM modality codes (PS3.16 CID 29/33), R4 ImagingStudy.modality binding."""

_V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"

# DICOM attributes (PS3.6 data dictionary), named for readability.
STUDY_INSTANCE_UID = "0020000D"
SERIES_INSTANCE_UID = "0020000E"
SOP_INSTANCE_UID = "00080018"
SOP_CLASS_UID = "00080016"
STUDY_DATE = "00080020"
STUDY_TIME = "00080030"
SERIES_DATE = "00080021"
SERIES_TIME = "00080031"
TIMEZONE_OFFSET_FROM_UTC = "00080201"
ACCESSION_NUMBER = "00080050"
ISSUER_OF_ACCESSION_NUMBER_SEQUENCE = "00080051"
LOCAL_NAMESPACE_ENTITY_ID = "00400031"
UNIVERSAL_ENTITY_ID = "00400032"
UNIVERSAL_ENTITY_ID_TYPE = "00400033"
MODALITIES_IN_STUDY = "00080061"
MODALITY = "00080060"
STUDY_DESCRIPTION = "00081030"
SERIES_DESCRIPTION = "0008103E"
REFERRING_PHYSICIAN_NAME = "00080090"
NUMBER_OF_STUDY_RELATED_SERIES = "00201206"
NUMBER_OF_STUDY_RELATED_INSTANCES = "00201208"
NUMBER_OF_SERIES_RELATED_INSTANCES = "00201209"
SERIES_NUMBER = "00200011"
INSTANCE_NUMBER = "00200013"
BODY_PART_EXAMINED = "00180015"
LATERALITY = "00200060"


def _modality_coding(code: str) -> dict[str, str]:
    return {"system": DCM, "code": code}


def _endpoint_reference() -> dict[str, str]:
    return {"reference": f"Endpoint/{WADO_ENDPOINT_ID}"}


def _unsigned(value: int | None) -> int | None:
    return value if value is not None and value >= 0 else None


def _accession_identifier(study: DicomJson) -> dict[str, Any] | None:
    """AccessionNumber with type v2-0203 ACSN; system from IssuerOfAccessionNumberSequence
    (PS3.3 10.14 HL7v2 Hierarchic Designator) when it carries an ISO OID or a URI."""
    accession = string(study, ACCESSION_NUMBER)
    if accession is None:
        return None
    identifier: dict[str, Any] = {
        "type": {"coding": [{"system": _V2_0203, "code": "ACSN"}]},
    }
    issuer = first_value(study, ISSUER_OF_ACCESSION_NUMBER_SEQUENCE)
    if isinstance(issuer, dict):
        universal = string(issuer, UNIVERSAL_ENTITY_ID)
        universal_type = (string(issuer, UNIVERSAL_ENTITY_ID_TYPE) or "").upper()
        local = string(issuer, LOCAL_NAMESPACE_ENTITY_ID)
        if universal and universal_type == "ISO" and re.fullmatch(r"[0-2](\.\d+)+", universal):
            identifier["system"] = f"urn:oid:{universal}"
        elif universal and universal_type == "URI" and ":" in universal:
            identifier["system"] = universal
        if local:
            identifier["assigner"] = {"display": local}
    identifier["value"] = accession
    return identifier


def _subject(study: DicomJson, ctx: MappingContext) -> dict[str, Any]:
    """Reference to the DICOM-view Patient; subject is 1..1, so display-only as a last resort."""
    subject: dict[str, Any] = {}
    patient_id = string(study, PATIENT_ID)
    if patient_id is not None:
        issuer = string(study, ISSUER_OF_PATIENT_ID)
        resource_id = patient_resource_id(patient_id, issuer)
        if resource_id is not None:
            subject["reference"] = f"Patient/{resource_id}"
        subject["identifier"] = patient_identifier(patient_id, issuer, ctx)
    display = name_text(person_name(study, PATIENT_NAME))
    if display:
        subject["display"] = display
    return subject or {"display": "unknown patient"}


def _instance(ds: DicomJson) -> dict[str, Any] | None:
    uid = string(ds, SOP_INSTANCE_UID)
    sop_class = string(ds, SOP_CLASS_UID)
    if uid is None or sop_class is None or not is_fhir_id(uid):
        return None  # uid and sopClass are 1..1 in R4
    instance: dict[str, Any] = {
        "uid": uid,
        "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{sop_class}"},
    }
    number = _unsigned(integer(ds, INSTANCE_NUMBER))
    if number is not None:
        instance["number"] = number
    return instance


def _number_then_uid(element: dict[str, Any]) -> tuple[bool, int, str]:
    number = element.get("number")
    return (number is None, number if number is not None else 0, element["uid"])


def _series(
    uid: str,
    ds: DicomJson,
    study_tz: str | None,
    instances: Sequence[DicomJson] | None,
    ctx: MappingContext,
) -> dict[str, Any]:
    series: dict[str, Any] = {"uid": uid}
    number = _unsigned(integer(ds, SERIES_NUMBER))
    if number is not None:
        series["number"] = number
    # modality is 1..1 in R4; "OT" (Other, PS3.3 C.7.3.1.1.1) when the PACS did not say.
    series["modality"] = _modality_coding((string(ds, MODALITY) or "OT").upper())
    description = string(ds, SERIES_DESCRIPTION)
    if description:
        series["description"] = description
    count = _unsigned(integer(ds, NUMBER_OF_SERIES_RELATED_INSTANCES))
    mapped_instances = None
    if instances is not None:
        mapped_instances = [i for i in (_instance(ds_) for ds_ in instances) if i is not None]
        mapped_instances.sort(key=_number_then_uid)
        if count is None:
            count = len(instances)
    if count is not None:
        series["numberOfInstances"] = count
    series["endpoint"] = [_endpoint_reference()]
    body_site = body_site_coding(string(ds, BODY_PART_EXAMINED))
    if body_site:
        series["bodySite"] = body_site
    laterality = laterality_coding(string(ds, LATERALITY))
    if laterality:
        series["laterality"] = laterality
    started = fhir_datetime(
        string(ds, SERIES_DATE),
        string(ds, SERIES_TIME),
        string(ds, TIMEZONE_OFFSET_FROM_UTC) or study_tz,
        ctx.default_timezone,
    )
    if started:
        series["started"] = started
    if mapped_instances:
        series["instance"] = mapped_instances
    return series


def _group_instances(instances: Iterable[DicomJson]) -> dict[str, list[DicomJson]]:
    groups: dict[str, list[DicomJson]] = {}
    for ds in instances:
        uid = string(ds, SERIES_INSTANCE_UID)
        if uid is not None:
            groups.setdefault(uid, []).append(ds)
    return groups


def imaging_study_from_dicom(
    study: DicomJson,
    series: Sequence[DicomJson],
    instances: Sequence[DicomJson] | None,
    ctx: MappingContext,
) -> dict[str, Any]:
    """An R4 ImagingStudy from QIDO-RS study, series and (optionally) instance results.

    id is the StudyInstanceUID (DICOM UIDs, PS3.5 9.1, fit the FHIR id pattern). Series come sorted
    by number then uid; instances appear only when `instances` is given (grouped by
    SeriesInstanceUID; those without SOPClassUID are left out, sopClass being 1..1). Series that
    appear only among the instances are still listed. Study-level counts, when the PACS omits them,
    are computed from the series. Raises ValueError when the StudyInstanceUID is missing or invalid.
    """
    study_uid = string(study, STUDY_INSTANCE_UID)
    if study_uid is None or not is_fhir_id(study_uid):
        raise ValueError(f"study: StudyInstanceUID (0020,000D) {study_uid!r} is not a valid FHIR id")
    study_tz = string(study, TIMEZONE_OFFSET_FROM_UTC)
    resource: dict[str, Any] = {"resourceType": "ImagingStudy", "id": study_uid}
    identifiers: list[dict[str, Any]] = [uid_identifier(study_uid)]
    accession = _accession_identifier(study)
    if accession:
        identifiers.append(accession)
    resource["identifier"] = identifiers
    resource["status"] = "available"

    grouped = _group_instances(instances) if instances is not None else {}
    series_by_uid: dict[str, DicomJson] = {}
    for ds in series:
        uid = string(ds, SERIES_INSTANCE_UID)
        if uid is not None and is_fhir_id(uid) and uid not in series_by_uid:
            series_by_uid[uid] = ds
    for uid, members in grouped.items():
        if uid not in series_by_uid and is_fhir_id(uid):
            # Known only from its instances: the instance dataset stands in for the series one.
            series_by_uid[uid] = members[0]
    mapped_series = [
        _series(uid, ds, study_tz, grouped.get(uid, []) if instances is not None else None, ctx)
        for uid, ds in series_by_uid.items()
    ]
    mapped_series.sort(key=_number_then_uid)

    modalities = strings(study, MODALITIES_IN_STUDY)
    if not modalities:
        modalities = [s["modality"]["code"] for s in mapped_series]
    unique_modalities = list(dict.fromkeys(code.upper() for code in modalities))
    if unique_modalities:
        resource["modality"] = [_modality_coding(code) for code in unique_modalities]
    resource["subject"] = _subject(study, ctx)
    started = fhir_datetime(
        string(study, STUDY_DATE), string(study, STUDY_TIME), study_tz, ctx.default_timezone
    )
    if started:
        resource["started"] = started
    referrer = name_text(person_name(study, REFERRING_PHYSICIAN_NAME))
    if referrer:
        resource["referrer"] = {"display": referrer}
    resource["endpoint"] = [_endpoint_reference()]

    number_of_series = _unsigned(integer(study, NUMBER_OF_STUDY_RELATED_SERIES))
    if number_of_series is None and mapped_series:
        number_of_series = len(mapped_series)
    if number_of_series is not None:
        resource["numberOfSeries"] = number_of_series
    number_of_instances = _unsigned(integer(study, NUMBER_OF_STUDY_RELATED_INSTANCES))
    if number_of_instances is None and mapped_series:
        counts = [s.get("numberOfInstances") for s in mapped_series]
        if all(count is not None for count in counts):
            number_of_instances = sum(count for count in counts if count is not None)
    if number_of_instances is not None:
        resource["numberOfInstances"] = number_of_instances
    description = string(study, STUDY_DESCRIPTION)
    if description:
        resource["description"] = description
    if mapped_series:
        resource["series"] = mapped_series
    return with_narrative(resource, imaging_study_narrative(resource))


def imaging_study_narrative(study: dict[str, Any]) -> dict[str, str]:
    """A compact summary of the study (R4 narrative.html): date, description, modalities, counts,
    and one row per series."""
    accession = next(
        (
            i.get("value")
            for i in study.get("identifier", [])
            if any(c.get("code") == "ACSN" for c in i.get("type", {}).get("coding", []))
        ),
        None,
    )
    modalities = joined(c.get("code") for c in study.get("modality", []))
    return narrative(
        Paragraph(
            f"Imaging study {study.get('description') or '(no description)'}"
            + (f", {modalities}" if modalities else "")
            + (f", {study['started']}" if study.get("started") else "")
            + "."
        ),
        Facts(
            [
                ("Patient", reference_text(study.get("subject"))),
                ("Date", study.get("started")),
                ("Description", study.get("description")),
                ("Modalities", modalities),
                ("Accession number", accession),
                ("Referring physician", study.get("referrer", {}).get("display")),
                ("Series", study.get("numberOfSeries")),
                ("Instances", study.get("numberOfInstances")),
                ("Study Instance UID", study["id"]),
            ]
        ),
        Table(
            ("Series", "Modality", "Description", "Instances"),
            [
                (
                    series.get("number", ""),
                    series["modality"].get("code", ""),
                    series.get("description", ""),
                    series.get("numberOfInstances", ""),
                )
                for series in study.get("series", [])
            ],
        ),
    )
