"""FHIR R4 ServiceRequest (an imaging order) -> DICOM Modality Worklist item (PS3.4 Annex K).

The item is the dataset that a Modality Worklist SCP returns to a modality's C-FIND (PS3.4 K.6.1.2,
Table K.6-1). Orthanc's ModalityWorklists plugin serves such datasets from a folder of `.wl` files
as they are, so this module builds exactly the file: Part 10 file meta with the Modality Worklist
Information Model - FIND SOP class, explicit VR little endian, UTF-8 text (ISO_IR 192).

The mapping is pure (no I/O): a ServiceRequest and optionally its subject Patient as FHIR R4 JSON
dicts in, a `pydicom.Dataset` out. Return keys of Type 1 in Table K.6-1 that the order cannot fill
raise `WorklistMappingError` with a FHIRPath-like `expression`, so a REST handler can answer 422 with
an OperationOutcome pointing at the element (FHIR operationoutcome.html, issue.expression).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

from fhir_facade.dicom_to_fhir.coding_schemes import coding_scheme_designator
from fhir_facade.dicom_to_fhir.uids import DICOM_UID_SYSTEM, uid_from_identifier
from fhir_facade.worklist.procedures import ProcedureCatalogue, bundled_catalogue

__all__ = [
    "DCM_SYSTEM",
    "DEFAULT_STATION_AE_TITLE",
    "MODALITY_WORKLIST_FIND",
    "ModalityNotDerived",
    "RequestedProcedure",
    "WorklistMappingError",
    "check_stations",
    "dicom_patient_sex",
    "fhir_birth_date_as_da",
    "is_imaging_order",
    "order_accession_number",
    "pn_from_human_names",
    "requested_procedure",
    "worklist_item",
]

MODALITY_WORKLIST_FIND = UID("1.2.840.10008.5.1.4.31")
"""Modality Worklist Information Model - FIND SOP Class (PS3.4 K.6.1.2, PS3.6 Annex A)."""

DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
"""FHIR system of DICOM codes (PS3.16); acquisition modalities are CID 29 terms such as CT, MR."""

DEFAULT_STATION_AE_TITLE = "ANY-SCU"
"""Scheduled Station AE Title when the caller names no station. (0040,0001) is Type 1 (Table K.6-1);
a modality that queries with its own AE title as a matching key will not see items carrying this
placeholder, one that leaves the key empty (universal matching, PS3.4 C.2.2.2.3) will."""

_ACSN_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
_UID_ENTROPY_NAMESPACE = "fhir-facade:ServiceRequest:StudyInstanceUID"

# R4 request-priority (valueset-request-priority.html) -> Requested Procedure Priority (0040,1003)
# defined terms STAT, HIGH, ROUTINE, MEDIUM, LOW (PS3.3 C.4.11 / Table 10-9 attribute notes).
_PRIORITIES: dict[str, str] = {"stat": "STAT", "asap": "HIGH", "urgent": "HIGH", "routine": "ROUTINE"}

# R4 administrative-gender -> Patient's Sex (0010,0040) enumerated values M, F, O (PS3.3 C.7.1.1);
# "unknown" stays empty, which the Type 2 attribute allows.
_SEXES: dict[str, str] = {"male": "M", "female": "F", "other": "O"}

# A modality in DCM is an upper-case CS term (PS3.3 C.7.3.1.1.1, CID 29); DCM's numeric concept codes
# (e.g. 110150) share the system, so they are told apart by shape.
_MODALITY = re.compile(r"[A-Z]{1,16}")
# AE VR: up to 16 characters of the default repertoire without backslash or controls (PS3.5 6.2).
_AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")
_FHIR_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_FHIR_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")
_SH_MAX = 16


class WorklistMappingError(ValueError):
    """The ServiceRequest lacks what a worklist item needs (a Type 1 key of PS3.4 Table K.6-1).

    `expression` names the FHIR element (FHIRPath-like, e.g. "ServiceRequest.occurrence") so the REST
    layer can report it in OperationOutcome.issue.expression with a 422 (FHIR http.html#2.21.0.16).
    """

    def __init__(self, message: str, expression: str) -> None:
        super().__init__(f"{expression}: {message}")
        self.expression = expression


class ModalityNotDerived(WorklistMappingError):
    """Neither a DCM modality coding nor the procedure catalogue gives the order's modality.

    Unlike the other mapping errors this is no fault of the order: the catalogue lacks its code. The
    order is stored and a person schedules it (ADR 0018)."""


@dataclass(frozen=True)
class RequestedProcedure:
    """What the worklist item says is to be done: the modality of the step, the Requested Procedure
    Code Sequence item (designator, code, meaning) when the order has a usable code, and the description."""

    modality: str
    code: tuple[str, str, str] | None
    description: str


def worklist_item(
    service_request: Mapping[str, Any],
    patient: Mapping[str, Any] | None = None,
    *,
    station_ae_title: str = DEFAULT_STATION_AE_TITLE,
    stations: Mapping[str, str] | None = None,
    catalogue: ProcedureCatalogue | None = None,
) -> Dataset:
    """Build the Modality Worklist item (PS3.4 K.6-1) for one R4 ServiceRequest (servicerequest.html).

    One Requested Procedure with one Scheduled Procedure Step: the modality comes from a DCM
    coding of the order or else from the procedure `catalogue` (default: the bundled one), the station
    from `stations` (modality -> AE title) or else `station_ae_title`, the start from the order;
    patient demographics from `patient` when given, else from `ServiceRequest.subject` (identifier,
    display). The Study Instance UID is derived from the ServiceRequest id, so rewriting the item
    after an update keeps the same study (and the images the modality already sent stay in it),
    unless the order carries its own `urn:dicom:uid` identifier.

    Raises `ModalityNotDerived` when no modality can be derived (checked first: such an order goes to
    a person whatever else it lacks), `WorklistMappingError` for a missing id, patient id or name or
    start time, and `ValueError` for a resource of the wrong type or a malformed station AE title.
    """
    _require_type(service_request, "ServiceRequest", "service_request")
    if patient is not None:
        _require_type(patient, "Patient", "patient")
    procedure = requested_procedure(service_request, catalogue)
    station_ae_title = (stations or {}).get(procedure.modality, station_ae_title)
    if not _AE_TITLE.fullmatch(station_ae_title) or not station_ae_title.strip():
        raise ValueError(f"station_ae_title {station_ae_title!r} is not a DICOM AE title (PS3.5 6.2)")

    request_id = service_request.get("id")
    if not isinstance(request_id, str) or not request_id:
        raise WorklistMappingError(
            "an id is needed to name the worklist item and its study", "ServiceRequest.id"
        )

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    _patient_attributes(ds, service_request, patient)

    # Imaging Service Request module (PS3.3 C.4.13).
    ds.AccessionNumber = order_accession_number(service_request)
    ds.ReferringPhysicianName = _pn_from_text(_reference_display(service_request.get("requester")))

    # Requested Procedure module (PS3.3 C.4.11).
    description = procedure.description
    procedure_id = _short_id(request_id)
    ds.RequestedProcedureID = procedure_id
    ds.RequestedProcedureDescription = description
    if procedure.code is not None:
        ds.RequestedProcedureCodeSequence = _code_sequence(procedure.code)
    ds.StudyInstanceUID = _study_instance_uid(service_request, request_id)
    ds.RequestedProcedurePriority = _PRIORITIES.get(str(service_request.get("priority", "")), "")

    # Scheduled Procedure Step module (PS3.3 C.4.10): one step per order.
    start = _occurrence_start(service_request)
    step = Dataset()
    step.ScheduledStationAETitle = station_ae_title
    step.ScheduledProcedureStepStartDate = start.strftime("%Y%m%d")
    if isinstance(start, datetime):
        step.ScheduledProcedureStepStartTime = _dicom_time(start)
    else:
        step.ScheduledProcedureStepStartTime = ""
    step.Modality = procedure.modality
    step.ScheduledPerformingPhysicianName = ""
    step.ScheduledProcedureStepDescription = description
    step.ScheduledProcedureStepID = procedure_id
    ds.ScheduledProcedureStepSequence = DicomSequence([step])
    if isinstance(start, datetime) and start.utcoffset() is not None:
        # Says which offset the local start date/time above is in (PS3.3 C.12.1.1.8).
        ds.TimezoneOffsetFromUTC = _dicom_offset(start.utcoffset())

    ds.file_meta = _file_meta(request_id)
    return ds


def check_stations(stations: Mapping[str, str]) -> None:
    """Validate a modality -> Scheduled Station AE Title map: keys are DCM modality terms (PS3.3
    C.7.3.1.1.1), values AE titles (PS3.5 6.2). Raises ValueError naming the bad entry."""
    for modality, title in stations.items():
        if not _MODALITY.fullmatch(modality):
            raise ValueError(f"{modality!r} is not a DICOM modality (upper-case defined term, e.g. MR)")
        if not _AE_TITLE.fullmatch(title) or not title.strip():
            raise ValueError(f"station {title!r} for {modality} is not a DICOM AE title (PS3.5 6.2)")


def _require_type(resource: Mapping[str, Any], resource_type: str, argument: str) -> None:
    if resource.get("resourceType") != resource_type:
        raise ValueError(f"{argument} must be a {resource_type}, got {resource.get('resourceType')!r}")


def _file_meta(request_id: str) -> FileMetaDataset:
    """Part 10 file meta (PS3.10 7.1): the plugin reads the .wl file as a DICOM file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MODALITY_WORKLIST_FIND
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[_UID_ENTROPY_NAMESPACE, "item", request_id])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _patient_attributes(
    ds: Dataset, service_request: Mapping[str, Any], patient: Mapping[str, Any] | None
) -> None:
    """Patient Identification and Demographic modules (PS3.3 C.2.2, C.2.3): PatientName and PatientID
    are Type 1 return keys in K.6-1, birth date and sex Type 2 (present, possibly empty)."""
    subject = service_request.get("subject") or {}
    patient_id = (subject.get("identifier") or {}).get("value")
    if not patient_id and patient is not None:
        patient_id = next((i.get("value") for i in patient.get("identifier", []) if i.get("value")), None)
    if not patient_id:
        raise WorklistMappingError(
            "no patient identifier (subject.identifier.value or the Patient's identifier) for PatientID",
            "ServiceRequest.subject.identifier",
        )
    ds.PatientID = patient_id

    name = pn_from_human_names(patient.get("name", [])) if patient is not None else ""
    name = name or _pn_from_text(_reference_display(subject))
    if not name:
        raise WorklistMappingError(
            "no patient name (Patient.name or subject.display) for PatientName", "ServiceRequest.subject"
        )
    ds.PatientName = name

    ds.PatientBirthDate = fhir_birth_date_as_da((patient or {}).get("birthDate"))
    ds.PatientSex = dicom_patient_sex((patient or {}).get("gender"))


def fhir_birth_date_as_da(birth_date: Any) -> str:
    """Patient.birthDate -> DA. DA needs a full date (PS3.5 6.2); FHIR allows "1970" or "1970-05",
    which give "" (PatientBirthDate is Type 2: present, possibly empty)."""
    text = str(birth_date or "")
    return text.replace("-", "") if _FHIR_DATE.fullmatch(text) else ""


def dicom_patient_sex(gender: Any) -> str:
    """Patient.gender -> Patient's Sex (0010,0040) M, F, O; "unknown" or none gives ""."""
    return _SEXES.get(str(gender or ""), "")


def _pn_component(text: str) -> str:
    # ^ = \ delimit PN components, groups and values (PS3.5 6.2.1): they cannot occur inside one.
    return re.sub(r"[\^=\\]", " ", text).strip()


def pn_from_human_names(names: Sequence[Mapping[str, Any]]) -> str:
    """HumanName -> PN family^given^middle^prefix^suffix (PS3.5 6.2.1); the official name first.

    given[0] is the given name and further given names the middle name, the inverse of
    dicom_to_fhir.names. A name with only `text` becomes a one-component (family) PN.
    """
    usable = [n for n in names if n.get("use") not in ("old", "anonymous")] or list(names)
    ordered = sorted(usable, key=lambda n: n.get("use") != "official")
    for name in ordered:
        given = [_pn_component(str(g)) for g in name.get("given", [])]
        components = [
            _pn_component(str(name.get("family", ""))),
            given[0] if given else "",
            " ".join(g for g in given[1:] if g),
            " ".join(_pn_component(str(p)) for p in name.get("prefix", [])),
            " ".join(_pn_component(str(s)) for s in name.get("suffix", [])),
        ]
        if any(components):
            return "^".join(components).rstrip("^")
        if text := _pn_component(str(name.get("text", ""))):
            return text
    return ""


def _pn_from_text(text: str) -> str:
    """Free text (Reference.display) cannot be split into name parts reliably; it becomes the family
    name component, which is how PS3.5 6.2.1 reads a PN without component delimiters."""
    return _pn_component(text)


def _reference_display(reference: Mapping[str, Any] | None) -> str:
    return str((reference or {}).get("display", ""))


def order_accession_number(service_request: Mapping[str, Any]) -> str:
    """The identifier typed v2-0203 ACSN (the ImagingStudy convention), else the first one."""
    identifiers = [i for i in service_request.get("identifier", []) if i.get("value")]
    for identifier in identifiers:
        for coding in (identifier.get("type") or {}).get("coding", []):
            if coding.get("system") == _ACSN_TYPE_SYSTEM and coding.get("code") == "ACSN":
                return str(identifier["value"])
    plain = [i for i in identifiers if i.get("system") != DICOM_UID_SYSTEM]
    return str(plain[0]["value"]) if plain else ""


def _study_instance_uid(service_request: Mapping[str, Any], request_id: str) -> UID:
    """An order-given study UID (identifier urn:dicom:uid, value urn:oid:...) wins; otherwise a UID
    hashed from the ServiceRequest id under pydicom's root (PS3.5 9.1), stable across rewrites."""
    for identifier in service_request.get("identifier", []):
        uid = uid_from_identifier(identifier)
        if uid is not None:
            return UID(uid)
    return generate_uid(entropy_srcs=[_UID_ENTROPY_NAMESPACE, request_id])


def _short_id(request_id: str) -> str:
    """Requested Procedure ID and Scheduled Procedure Step ID are SH (16 characters, PS3.5 6.2);
    FHIR ids run to 64, so a longer id is replaced by a stable digest of it."""
    if len(request_id) <= _SH_MAX:
        return request_id
    return hashlib.sha256(request_id.encode()).hexdigest()[:_SH_MAX].upper()


def _codings(concept: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    return list((concept or {}).get("coding", []))


def _procedure_description(service_request: Mapping[str, Any]) -> str:
    code = service_request.get("code") or {}
    if text := code.get("text"):
        return str(text)
    return next((str(c["display"]) for c in _codings(code) if c.get("display")), "")


def _code_sequence(code: tuple[str, str, str]) -> DicomSequence:
    """One Code Sequence Macro item (PS3.3 8.8, Table 8.8-1a): CodeValue up to 16 characters, a longer
    code in LongCodeValue. Requested Procedure Code Sequence takes a single item (PS3.3 C.4.11)."""
    scheme, value, meaning = code
    item = Dataset()
    if len(value) <= _SH_MAX:
        item.CodeValue = value
    else:
        item.LongCodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning[:64]
    return DicomSequence([item])


def _order_code(codings: Iterable[Mapping[str, Any]]) -> tuple[str, str, str] | None:
    """The first coding of a system with a registered designator (PS3.16 Table 8-1); others are left
    out, since a Code Sequence item without a designator means nothing to the modality. CodeMeaning
    falls back to the code."""
    for coding in codings:
        scheme = coding_scheme_designator(str(coding.get("system", "")))
        value = str(coding.get("code", ""))
        if scheme is not None and value:
            return (scheme, value, str(coding.get("display") or value))
    return None


#: SNOMED CT 363679005 |Imaging (procedure)|, the usual ServiceRequest.category of imaging orders.
_IMAGING_CATEGORY = ("http://snomed.info/sct", "363679005")


def is_imaging_order(service_request: Mapping[str, Any], catalogue: ProcedureCatalogue | None = None) -> bool:
    """Whether a ServiceRequest asks for imaging: a DCM coding in code/orderDetail/category, the SNOMED
    CT category Imaging, or a code of the procedure catalogue. Only those become worklist items (or,
    when no modality can be derived, scheduling Tasks); other orders are just stored."""
    concepts: list[Mapping[str, Any]] = [service_request.get("code") or {}]
    concepts += service_request.get("orderDetail", []) + service_request.get("category", [])
    if any(
        coding.get("system") == DCM_SYSTEM or (coding.get("system"), coding.get("code")) == _IMAGING_CATEGORY
        for concept in concepts
        for coding in _codings(concept)
    ):
        return True
    catalogue = catalogue if catalogue is not None else bundled_catalogue()
    return catalogue.match(_codings(service_request.get("code"))) is not None


def requested_procedure(
    service_request: Mapping[str, Any], catalogue: ProcedureCatalogue | None = None
) -> RequestedProcedure:
    """Modality (0008,0060), Type 1 in the Scheduled Procedure Step (K.6-1), with the procedure code and
    description. A DCM modality coding in code, then orderDetail, then category wins (the order says
    so); else the first coding of `code` found in the catalogue gives modality, code and description
    (the catalogue's name, as the Order Filler's procedure catalogue does in IHE Scheduled Workflow).
    Raises `ModalityNotDerived` when neither gives a modality."""
    code = service_request.get("code") or {}
    concepts: list[Mapping[str, Any]] = [code]
    concepts += service_request.get("orderDetail", [])
    concepts += service_request.get("category", [])
    for concept in concepts:
        for coding in _codings(concept):
            value = str(coding.get("code", ""))
            if coding.get("system") == DCM_SYSTEM and _MODALITY.fullmatch(value):
                return RequestedProcedure(
                    value, _order_code(_codings(code)), _procedure_description(service_request)
                )
    catalogue = catalogue if catalogue is not None else bundled_catalogue()
    entry = catalogue.match(_codings(code))
    if entry is not None:
        scheme = coding_scheme_designator(entry.system)
        procedure_code = (scheme, entry.code, entry.description) if scheme else None
        return RequestedProcedure(entry.modality, procedure_code, entry.description)
    raise ModalityNotDerived(
        f"no modality: no DCM modality coding (system {DCM_SYSTEM}, e.g. CT) in code, orderDetail or "
        "category, and no code of the procedure catalogue (ConceptMap procedure-to-modality, or the "
        "site's FACADE_WORKLIST_PROCEDURE_MAP)",
        "ServiceRequest.code",
    )


def _occurrence_start(service_request: Mapping[str, Any]) -> date | datetime:
    """occurrenceDateTime or occurrencePeriod.start, kept in its own offset: the modality shows local
    times, and the item states the offset in TimezoneOffsetFromUTC. occurrenceTiming is not mapped."""
    expression = "ServiceRequest.occurrence"
    if "occurrenceDateTime" in service_request:
        value = service_request["occurrenceDateTime"]
        expression = "ServiceRequest.occurrenceDateTime"
    elif "occurrencePeriod" in service_request:
        value = (service_request["occurrencePeriod"] or {}).get("start")
        expression = "ServiceRequest.occurrencePeriod.start"
    else:
        value = None
    if not isinstance(value, str):
        raise WorklistMappingError(
            "a start (occurrenceDateTime or occurrencePeriod.start) is needed for "
            "ScheduledProcedureStepStartDate",
            expression,
        )
    if _FHIR_DATE.fullmatch(value):
        return date.fromisoformat(value)
    if _FHIR_DATETIME.fullmatch(value):
        return datetime.fromisoformat(value)
    raise WorklistMappingError(f"{value!r} is not a full date or a dateTime with time zone", expression)


def _dicom_time(moment: datetime) -> str:
    """TM HHMMSS[.FFFFFF] (PS3.5 6.2) in the moment's own offset."""
    text = moment.strftime("%H%M%S")
    return f"{text}.{moment.microsecond:06d}".rstrip("0") if moment.microsecond else text


def _dicom_offset(offset: timedelta | None) -> str:
    """&ZZXX (PS3.3 C.12.1.1.8), e.g. +0200 or -0500."""
    minutes = int((offset or timedelta()).total_seconds() // 60)
    sign = "-" if minutes < 0 else "+"
    hours, rest = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}{rest:02d}"
