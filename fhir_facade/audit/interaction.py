"""What a request does, from its method, path and query alone: the FHIR RESTful interaction
(R4 http.html, CodeSystem restful-interaction) or DICOMweb transaction (PS3.18) an AuditEvent
records, with the resources it names. Pure: no I/O, so it is tested on strings.

Which requests are audited at all is decided here too (`is_audited`): the FHIR API under /fhir
(operations such as $analyze and $sync-status included) and DICOMweb under /dicom-web, but not
the CapabilityStatement, discovery documents, docs, metrics or key sets.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qsl, urlencode

from fhir_facade.fhir.ids import RESOURCE_TYPE_PATTERN, is_fhir_id

__all__ = [
    "DCM",
    "DICOMWEB_PREFIX",
    "FHIR_PREFIX",
    "Interaction",
    "describe_interaction",
    "is_audited",
    "needs_body",
]

FHIR_PREFIX: Final = "/fhir"
DICOMWEB_PREFIX: Final = "/dicom-web"

#: DICOM Controlled Terminology (PS3.16), the system of the DICOM audit event ids.
DCM: Final = "http://dicom.nema.org/resources/ontology/DCM"
_AUDIT_EVENT_TYPE: Final = "http://terminology.hl7.org/CodeSystem/audit-event-type"
REST_EVENT: Final = {"system": _AUDIT_EVENT_TYPE, "code": "rest", "display": "RESTful Operation"}
_DICOM_QUERY: Final = {"system": DCM, "code": "110112", "display": "Query"}
_DICOM_EXPORT: Final = {"system": DCM, "code": "110106", "display": "Export"}
_DICOM_IMPORT: Final = {"system": DCM, "code": "110107", "display": "Import"}
#: PS3.15 A.5.3.5 / PS3.16 CID 400: a whole study removed from the archive (DELETE ImagingStudy,
#: ADR 0040). A PACS administrator's audit search looks for this code, not for a generic delete.
_DICOM_STUDY_DELETED: Final = {"system": DCM, "code": "110105", "display": "DICOM Study Deleted"}

_TYPE = re.compile(rf"^{RESOURCE_TYPE_PATTERN}$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: Operations whose URL names a resource after the operation: `$analyze-jobs/{task id}`.
_OPERATION_TARGETS: Final = {"analyze-jobs": "Task"}
#: Search parameters whose value names the patient a request is about.
_PATIENT_PARAMS: Final = ("patient", "subject", "for")
#: Paths never audited although under an audited prefix: the CapabilityStatement and discovery.
_UNAUDITED_SEGMENTS: Final = frozenset({".well-known"})
_METHOD_ACTION: Final = {"GET": "R", "HEAD": "R", "POST": "C", "PUT": "U", "PATCH": "U", "DELETE": "D"}
_INSTANCE_SUBTYPES: Final = {
    "GET": "read",
    "HEAD": "read",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
}
_DICOMWEB_QUERY_LEVELS: Final = frozenset({"studies", "series", "instances"})


@dataclass(frozen=True)
class Interaction:
    """One request as an audit record sees it.

    `event_type` is the AuditEvent.type Coding; `subtype` a restful-interaction code; `action` the
    AuditEvent.action code (C/R/U/D/E). `targets` are the references acted on (`Type/id`, or
    `Type/id/_history/n` for a vread); `query` the request relative to the service base
    (`Observation?patient=1`) when it searches; `patients` the Patient ids the path or the
    search parameters name; `studies` the Study Instance UIDs of a DICOMweb path.
    """

    method: str
    path: str
    event_type: dict[str, str]
    action: str
    subtype: str | None = None
    resource_type: str | None = None
    targets: tuple[str, ...] = ()
    operation: str | None = None
    query: str | None = None
    patients: tuple[str, ...] = ()
    studies: tuple[str, ...] = ()
    dicomweb: bool = False


def _segments(path: str, prefix: str) -> list[str] | None:
    """The path's segments below `prefix`, or None when the path is not under it."""
    if path != prefix and not path.startswith(prefix + "/"):
        return None
    return [s for s in path[len(prefix) :].split("/") if s]


def is_audited(path: str) -> bool:
    """Whether requests to `path` get an AuditEvent: everything under /fhir except `metadata`
    (the CapabilityStatement) and `.well-known` discovery, and everything under /dicom-web."""
    for prefix in (FHIR_PREFIX, DICOMWEB_PREFIX):
        segments = _segments(path, prefix)
        if segments is None:
            continue
        if _UNAUDITED_SEGMENTS.intersection(segments):
            return False
        return not (prefix == FHIR_PREFIX and segments == ["metadata"])
    return False


def needs_body(method: str, path: str) -> bool:
    """Whether the request body says what the interaction is: a Bundle POSTed to the base
    (batch or transaction) or a form POSTed to `_search` (its search parameters)."""
    if method != "POST":
        return False
    segments = _segments(path, FHIR_PREFIX)
    return segments is not None and (segments == [] or segments[-1] == "_search")


def describe_interaction(method: str, path: str, query: str = "", body: bytes | None = None) -> Interaction:
    """The interaction of an audited request (`is_audited`). `query` is the raw query string;
    `body` the request body when `needs_body` asked for it."""
    method = method.upper()
    dicomweb = _segments(path, DICOMWEB_PREFIX)
    if dicomweb is not None:
        return _dicomweb(method, path, dicomweb, query)
    return _fhir(method, path, _segments(path, FHIR_PREFIX) or [], query, body)


def _relative(base: str, params: list[tuple[str, str]]) -> str:
    return f"{base}?{urlencode(params)}" if params else base


def _patients(resource_type: str | None, params: list[tuple[str, str]]) -> tuple[str, ...]:
    """Patient ids named by `patient=`, `subject=Patient/..` (and Task `for=`) search values."""
    found: dict[str, None] = {}
    for name, raw in params:
        base_name = name.split(":", 1)[0]
        if base_name not in _PATIENT_PARAMS:
            continue
        for value in raw.split(","):
            value = value.strip()
            if value.startswith("Patient/"):
                value = value.removeprefix("Patient/")
            elif base_name != "patient" and name != f"{base_name}:Patient":
                continue  # subject=123 may be any type
            if is_fhir_id(value):
                found[value] = None
    if resource_type == "Patient":
        for name, raw in params:
            if name == "_id":
                found.update((v, None) for v in raw.split(",") if is_fhir_id(v))
    return tuple(found)


def _form(body: bytes | None) -> list[tuple[str, str]]:
    return parse_qsl((body or b"").decode("utf-8", "replace"), keep_blank_values=True)


def _fhir(method: str, path: str, segments: list[str], query: str, body: bytes | None) -> Interaction:
    params = parse_qsl(query, keep_blank_values=True)
    if not segments:
        if method == "POST":
            return Interaction(method, path, REST_EVENT, "E", _bundle_type(body))
        return Interaction(
            method, path, REST_EVENT, "R", "search-system", query=_relative("", params) or None
        )
    first = segments[0]
    if first.startswith("$"):  # system-level operation, e.g. $sync-status, $analyze-jobs/{id}
        name = first[1:]
        target_type = _OPERATION_TARGETS.get(name)
        named = len(segments) == 2 and is_fhir_id(segments[1])
        return Interaction(
            method,
            path,
            REST_EVENT,
            "E",
            "operation",
            targets=(f"{target_type}/{segments[1]}",) if target_type and named else (),
            operation=name,
            query=_query(first, params),
        )
    if first == "_history":
        return Interaction(method, path, REST_EVENT, "R", "history-system", query=_query(first, params))
    if first == "_search":
        every = params + _form(body)
        return Interaction(method, path, REST_EVENT, "R", "search-system", query=_relative("", every) or None)
    resource_type = first if _TYPE.match(first) else None
    if len(segments) == 1:
        if method in ("GET", "HEAD"):
            return _search(method, path, resource_type, first, params)
        write = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method)
        conditional = _relative(first, params) if params and method != "POST" else None
        action = _METHOD_ACTION.get(method, "E")
        return Interaction(method, path, REST_EVENT, action, write, resource_type, query=conditional)
    resource_id = segments[1]
    if len(segments) == 2 and resource_id == "_search":
        return _search(method, path, resource_type, first, params + _form(body))
    if len(segments) == 2 and resource_id == "_history":
        query_text = _query(f"{first}/_history", params)
        return Interaction(method, path, REST_EVENT, "R", "history-type", resource_type, query=query_text)
    if len(segments) == 2 and resource_id.startswith("$"):  # type-level operation
        query_text = _query(f"{first}/{resource_id}", params)
        return Interaction(
            method,
            path,
            REST_EVENT,
            "E",
            "operation",
            resource_type,
            operation=resource_id[1:],
            query=query_text,
        )
    valid = resource_type is not None and is_fhir_id(resource_id)
    target = f"{resource_type}/{resource_id}" if valid else None
    patients = (resource_id,) if valid and resource_type == "Patient" else ()
    operation: str | None = None
    subtype: str | None
    if len(segments) == 2:
        subtype = _INSTANCE_SUBTYPES.get(method)
        action = _METHOD_ACTION.get(method, "E")
    elif len(segments) == 3 and segments[2] == "_history":
        subtype, action = "history-instance", "R"
    elif len(segments) == 3 and segments[2].startswith("$"):
        subtype, action, operation = "operation", "E", segments[2][1:]
    elif len(segments) == 4 and segments[2] == "_history":
        subtype, action = "vread", "R"
        target = f"{target}/_history/{segments[3]}" if target and is_fhir_id(segments[3]) else None
    else:
        subtype, action = None, _METHOD_ACTION.get(method, "E")
    study_deleted = subtype == "delete" and resource_type == "ImagingStudy"
    return Interaction(
        method,
        path,
        _DICOM_STUDY_DELETED if study_deleted else REST_EVENT,
        action,
        subtype,
        resource_type,
        targets=(target,) if target else (),
        operation=operation,
        patients=patients,
    )


def _search(
    method: str, path: str, resource_type: str | None, first: str, params: list[tuple[str, str]]
) -> Interaction:
    return Interaction(
        method,
        path,
        REST_EVENT,
        "R",
        "search-type",
        resource_type,
        query=_relative(first, params),
        patients=_patients(resource_type, params),
    )


def _query(where: str, params: list[tuple[str, str]]) -> str | None:
    """The query entity of an operation or history request: only when it has parameters."""
    return _relative(where.removeprefix(FHIR_PREFIX + "/"), params) if params else None


def _bundle_type(body: bytes | None) -> str:
    """`transaction` or `batch`, from the posted Bundle's top-level `type` (batch when unreadable:
    the request then failed with 400 and the difference does not matter)."""
    try:
        bundle = json.loads(body or b"")
    except (ValueError, RecursionError):  # a hostile body nested ~1000 deep must still be audited
        return "batch"
    return "transaction" if isinstance(bundle, dict) and bundle.get("type") == "transaction" else "batch"


def _dicomweb(method: str, path: str, segments: list[str], query: str) -> Interaction:
    """QIDO-RS (a path ending in studies/series/instances: Query), WADO-RS (any other GET:
    Export, data leaves the archive) and STOW-RS (POST: Import), as DICOM audit event ids."""
    studies = tuple(
        segments[i + 1]
        for i, segment in enumerate(segments[:-1])
        if segment == "studies" and _UID.match(segments[i + 1])
    )
    relative = "/".join(segments)
    subtype: str | None
    query_text: str | None
    if method in ("GET", "HEAD") and segments and segments[-1] in _DICOMWEB_QUERY_LEVELS:
        event, action, subtype = _DICOM_QUERY, "E", "search-type"
        query_text = f"{relative}?{query}" if query else relative
    elif method in ("GET", "HEAD"):
        event, action, subtype, query_text = _DICOM_EXPORT, "R", "read", None
    elif method == "POST":
        event, action, subtype, query_text = _DICOM_IMPORT, "C", "create", None
    else:
        event, action, query_text = REST_EVENT, _METHOD_ACTION.get(method, "E"), None
        subtype = _INSTANCE_SUBTYPES.get(method)
    return Interaction(method, path, event, action, subtype, query=query_text, studies=studies, dicomweb=True)
