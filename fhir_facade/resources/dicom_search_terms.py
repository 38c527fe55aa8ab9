"""FHIR search values -> QIDO constraints, for the parameters that several virtual types share
(dates, UIDs, patient references). Each function returns the QIDO options for one clause (ORed)
and, where QIDO cannot be exact, an exact post-filter over the returned DICOM JSON."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, tzinfo

from fhir_facade.dicom_to_fhir import (
    MappingContext,
    identifier_system_to_issuer,
    parse_patient_resource_id,
    patient_identifier,
    patient_resource_id,
)
from fhir_facade.dicom_to_fhir.uids import DICOM_UID_SYSTEM, OID_PREFIX
from fhir_facade.dicomweb import DicomJson
from fhir_facade.dicomweb.query import DateRange, OneOf, QidoQuery, tag_values
from fhir_facade.fhir.search import DateValue, ReferenceValue, SearchClause, TokenValue
from fhir_facade.resources.study_search import PostFilter, StudySearchPlan, dicom_tag

__all__ = [
    "DCM_SYSTEM",
    "UID_SYSTEM",
    "apply_date_clause",
    "apply_patient_clause",
    "patient_key",
    "strip_oid",
    "uid_values",
]

UID_SYSTEM = DICOM_UID_SYSTEM
SOP_CLASS_SYSTEM = "urn:ietf:rfc:3986"
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"

#: Instant of a study/patient attribute, for exact date filtering; None when it has none.
InstantOf = Callable[[DicomJson], datetime | None]


def strip_oid(value: str) -> str:
    return value.removeprefix(OID_PREFIX)


def uid_values(clause: SearchClause, systems: Sequence[str]) -> set[str]:
    """UIDs named by a token clause whose system is absent or one of `systems`."""
    uids = set()
    for value in clause.values:
        assert isinstance(value, TokenValue)
        if value.code and (value.system is None or value.system in systems):
            uids.add(strip_oid(value.code))
    return uids


def patient_key(ds: DicomJson) -> tuple[str, str | None]:
    """(PatientID, IssuerOfPatientID or None) of a DICOM JSON dataset."""
    pid = tag_values(ds, dicom_tag("PatientID"))
    issuer = tag_values(ds, dicom_tag("IssuerOfPatientID"))
    return (
        str(pid[0]).strip() if pid else "",
        (str(issuer[0]).strip() or None) if issuer else None,
    )


def _day_options(value: DateValue, keyword: str) -> list[QidoQuery] | None:
    """Exact DA range options for a date-precision value without offset, else None."""
    if value.has_timezone or value.precision in ("minute", "second"):
        return None
    first = value.lower.date()
    last = (value.upper - timedelta(microseconds=1)).date()
    day = timedelta(days=1)
    ranges = {
        "eq": [DateRange(first, last)],
        "ne": [DateRange(None, first - day), DateRange(last + day, None)],
        "gt": [DateRange(last + day, None)],
        "ge": [DateRange(first, None)],
        "lt": [DateRange(None, first - day)],
        "le": [DateRange(None, last)],
    }[value.prefix]
    return [QidoQuery({keyword: r}) for r in ranges]


def _superset_options(value: DateValue, keyword: str) -> list[QidoQuery]:
    """A DA range one day wider than the value on each side (offsets differ per study)."""
    day = timedelta(days=1)
    first, last = (value.lower - day).date(), (value.upper + day).date()
    wide = {
        "eq": DateRange(first, last),
        "gt": DateRange(first, None),
        "ge": DateRange(first, None),
        "lt": DateRange(None, last),
        "le": DateRange(None, last),
    }.get(value.prefix)
    return [QidoQuery({keyword: wide})] if wide else [QidoQuery()]


def _day_matcher(options: list[QidoQuery], keyword: str, tag: str) -> PostFilter:
    def matches(ds: DicomJson) -> bool:
        return any(o.constraints[keyword].matches(ds, tag) for o in options)

    return matches


def _instant_matcher(value: DateValue, instant_of: InstantOf, zone: tzinfo) -> PostFilter:
    lower, upper = value.lower, value.upper
    if not value.has_timezone:  # a local time: the server's configured DICOM zone
        lower, upper = lower.replace(tzinfo=zone), upper.replace(tzinfo=zone)

    def matches(ds: DicomJson) -> bool:
        instant = instant_of(ds)
        if instant is None:
            return False
        inside = lower <= instant < upper
        return {
            "eq": inside,
            "ne": not inside,
            "gt": instant >= upper,
            "ge": instant >= lower,
            "lt": instant < lower,
            "le": instant < upper,
        }[value.prefix]

    return matches


def apply_date_clause(
    plan: StudySearchPlan, clause: SearchClause, keyword: str, instant_of: InstantOf, zone: tzinfo
) -> None:
    """AND a date clause: day-precision values are exact DA ranges in QIDO; finer ones (or ones
    with an offset) query a wider DA range and are checked exactly on the results."""
    options: list[QidoQuery] = []
    matchers: list[PostFilter] = []
    exact_in_qido = True
    tag = dicom_tag(keyword)
    for value in clause.values:
        assert isinstance(value, DateValue)
        day_options = _day_options(value, keyword)
        if day_options is not None:
            options += day_options
            matchers.append(_day_matcher(day_options, keyword, tag))
        else:
            exact_in_qido = False
            options += _superset_options(value, keyword)
            matchers.append(_instant_matcher(value, instant_of, zone))
    plan.require_any(options)
    if not exact_in_qido:
        plan.filter(lambda ds: any(m(ds) for m in matchers))


def apply_patient_clause(plan: StudySearchPlan, clause: SearchClause, ctx: MappingContext) -> None:
    """AND a Patient reference clause (`Patient/id`, `id` or `:identifier=system|value`).

    QIDO narrows by PatientID; the exact test (issuer, identifier system) runs on the results,
    computed with the same mapping that produced the ids and identifiers.
    """
    pids: set[str] = set()
    ids: set[str] = set()
    identifiers: set[tuple[str | None, str]] = set()
    for value in clause.values:
        assert isinstance(value, ReferenceValue)
        if value.identifier is not None:
            token = value.identifier
            if not token.code:
                continue
            if token.system and not identifier_system_to_issuer(token.system, ctx)[0]:
                continue
            pids.add(token.code)
            identifiers.add((token.system or None, token.code))
        elif value.id is not None and value.resource_type in (None, "Patient"):
            try:
                pid, _issuer = parse_patient_resource_id(value.id)
            except ValueError:
                continue
            pids.add(pid)
            ids.add(value.id)
    if not pids:
        plan.match_nothing()
        return
    plan.require(QidoQuery({"PatientID": OneOf(frozenset(pids))}))

    def matches(ds: DicomJson) -> bool:
        pid, issuer = patient_key(ds)
        if patient_resource_id(pid, issuer) in ids:
            return True
        identifier = patient_identifier(pid, issuer, ctx)
        return any(
            identifier.get("value") == code and (system is None or identifier.get("system") == system)
            for system, code in identifiers
        )

    plan.filter(matches)
