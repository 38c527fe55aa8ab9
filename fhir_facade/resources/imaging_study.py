"""ImagingStudy: virtual, computed live from QIDO-RS on every request (nothing is copied).

A search page costs a bounded number of QIDO requests whatever its size: the study query (plus a
count query when the page cannot tell the total), one series query for all studies of the page
(Orthanc accepts UID lists), and one per `series`/`instance`/`dicom-class` clause to resolve them
to study UIDs. A read costs three (study, series, instances), sent concurrently.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from fhir_facade.dicom_to_fhir import MappingContext, imaging_study_from_dicom, started_instant
from fhir_facade.dicom_to_fhir.context import WADO_ENDPOINT_ID
from fhir_facade.dicomweb import DicomJson, DicomwebClient
from fhir_facade.dicomweb.orthanc_rest import OrthancRestClient
from fhir_facade.dicomweb.query import OneOf, QidoQuery, tag_values
from fhir_facade.fhir.bundles import SearchResult
from fhir_facade.fhir.errors import not_found
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.registry import check_search_handlers, registry
from fhir_facade.fhir.search import (
    IdentifierOfType,
    ReferenceValue,
    SearchClause,
    SearchParamDef,
    SearchParamType,
    SearchRequest,
    TokenValue,
)
from fhir_facade.resources.dicom_search_terms import (
    DCM_SYSTEM,
    SOP_CLASS_SYSTEM,
    UID_SYSTEM,
    apply_date_clause,
    apply_patient_clause,
    strip_oid,
    uid_values,
)
from fhir_facade.resources.study_search import (
    StudySearchPlan,
    dicom_tag,
    find_study_page,
    study_uid,
)

__all__ = ["ImagingStudyProvider", "OrdersByAccession"]

#: accession numbers -> {accession: [ServiceRequest ids]} (the store's orders, for basedOn)
OrdersByAccession = Callable[[list[str]], Awaitable[dict[str, list[str]]]]

_SPEC = "http://hl7.org/fhir/SearchParameter/"
T = SearchParamType

STUDY_FIELDS = ("00081030", "00080201", "00100021")
SERIES_FIELDS = ("0008103E", "00180015", "00200060", "00080021", "00080031", "00080201", "00100020")
INSTANCE_FIELDS = ("00080016", "00200013", "0020000E", "00100020")
_UID_LIST_CHUNK = 150  # UIDs per series query: keeps the URL well under common 16 KiB limits
_STATUS_SYSTEM = "http://hl7.org/fhir/imagingstudy-status"
#: Identifier.type of the accession number (dicom_to_fhir/imaging_study.py), for `:of-type`.
ACSN_TYPE = ("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN")


def _param(name: str, kind: SearchParamType, doc: str, definition: str, **kw: Any) -> SearchParamDef:
    return SearchParamDef(name, kind, doc, definition, **kw)


class ImagingStudyProvider(ResourceProvider):
    resource_type = "ImagingStudy"
    documentation = "Virtual: computed live from the PACS over QIDO-RS; id = Study Instance UID."
    include_paths: ClassVar[dict[str, tuple[str, ...]]] = registry()["ImagingStudy"].include_paths
    search_params = (
        _param("_id", T.TOKEN, "Study Instance UID(s)", _SPEC + "Resource-id"),
        _param(
            "identifier",
            T.TOKEN,
            "urn:dicom:uid|urn:oid:<Study UID>, or an accession number (no system); "
            f"modifier :of-type={ACSN_TYPE[0]}|{ACSN_TYPE[1]}|<accession number>",
            _SPEC + "clinical-identifier",
            modifiers=frozenset({"of-type"}),
        ),
        _param(
            "patient",
            T.REFERENCE,
            "Patient/<id> (DICOM PatientID, issuer-aware)",
            _SPEC + "clinical-patient",
            modifiers=frozenset({"identifier", "Patient"}),
            target_types=("Patient",),
        ),
        _param(
            "subject",
            T.REFERENCE,
            "Patient/<id>, or :identifier=system|MRN",
            _SPEC + "ImagingStudy-subject",
            modifiers=frozenset({"identifier", "Patient"}),
            target_types=("Patient", "Device", "Group"),
        ),
        _param(
            "started",
            T.DATE,
            "Study date/time; date-only values compare with the study's local date",
            _SPEC + "ImagingStudy-started",
        ),
        _param(
            "modality",
            T.TOKEN,
            "Modality in study (DCM codes, e.g. MR)",
            _SPEC + "ImagingStudy-modality",
        ),
        _param("series", T.TOKEN, "Series Instance UID", _SPEC + "ImagingStudy-series"),
        _param("instance", T.TOKEN, "SOP Instance UID", _SPEC + "ImagingStudy-instance"),
        _param(
            "dicom-class",
            T.TOKEN,
            "SOP Class UID of any instance in the study",
            _SPEC + "ImagingStudy-dicom-class",
        ),
        _param(
            "endpoint",
            T.REFERENCE,
            "Endpoint/dicom-wado-rs",
            _SPEC + "ImagingStudy-endpoint",
            target_types=("Endpoint",),
        ),
        _param(
            "status",
            T.TOKEN,
            "Always 'available' for studies in the PACS",
            _SPEC + "ImagingStudy-status",
        ),
    )

    def __init__(
        self,
        dicomweb: DicomwebClient,
        ctx: MappingContext,
        orthanc: OrthancRestClient | None = None,
        orders: OrdersByAccession | None = None,
        deletion: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._deletion = deletion  # DELETE is offered only with it (ADR 0040)
        self._dicomweb = dicomweb
        self._ctx = ctx
        self._orthanc = orthanc
        self._orders = orders

    @property
    def interactions(self) -> tuple[str, ...]:
        return ("read", "search-type", "delete") if self._deletion else ("read", "search-type")

    async def delete(self, resource_id: str) -> None:
        """FHIR http.html#delete: the study is deleted in the PACS (fhir_facade/intake/study_delete.py)."""
        if self._deletion is None:
            await super().delete(resource_id)  # 405
            return
        await self._deletion(resource_id)

    async def read(self, resource_id: str) -> dict[str, Any]:
        query = {"StudyInstanceUID": resource_id}
        studies, series, instances = await asyncio.gather(
            self._dicomweb.search_studies(query, include_fields=STUDY_FIELDS),
            self._dicomweb.search_series(query, include_fields=SERIES_FIELDS),
            self._dicomweb.search_instances(query, include_fields=INSTANCE_FIELDS),
        )
        studies = [s for s in studies if study_uid(s) == resource_id]
        if not studies:
            raise not_found(f"ImagingStudy/{resource_id} is not in the PACS")
        own = studies[0]
        study = imaging_study_from_dicom(
            own, _of_patient(series, own), _of_patient(instances, own), self._ctx
        )
        return (await self._with_orders([study]))[0]

    async def search(self, request: SearchRequest) -> SearchResult:
        plan = await self._plan(request)
        want_total = request.total != "none" or request.count == 0 or request.summary == "count"
        count = 0 if request.summary == "count" else request.count
        page, series = await find_study_page(
            self._dicomweb,
            plan,
            STUDY_FIELDS,
            count=count,
            offset=request.offset,
            want_total=want_total,
            details=self._series_of,
            count_exact=self._count_in_orthanc if self._orthanc else None,
        )
        by_study: dict[str, list[DicomJson]] = defaultdict(list)
        for ds in series:
            by_study[study_uid(ds)].append(ds)
        matches = [
            imaging_study_from_dicom(study, _of_patient(by_study[study_uid(study)], study), None, self._ctx)
            for study in page.studies
        ]
        return SearchResult(await self._with_orders(matches), page.total, page.has_next)

    async def _count_in_orthanc(self, query: QidoQuery) -> int:
        assert self._orthanc is not None
        return await self._orthanc.count_studies(query.params(separator="\\"))

    async def _with_orders(self, studies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Add basedOn -> the imaging orders with the study's accession number, looked up live in
        the store with one search for the whole page (the PACS knows nothing of FHIR orders)."""
        if self._orders is None:
            return studies
        accessions = {
            identifier["value"]
            for study in studies
            for identifier in study.get("identifier", [])
            if identifier.get("type") and identifier.get("value")
        }
        if not accessions:
            return studies
        orders = await self._orders(sorted(accessions))
        for study in studies:
            references = [
                {"reference": f"ServiceRequest/{order_id}"}
                for identifier in study.get("identifier", [])
                if identifier.get("type")
                for order_id in orders.get(identifier.get("value", ""), [])
            ]
            if references:
                study["basedOn"] = references
        return studies

    async def _series_of(self, studies: list[DicomJson]) -> list[DicomJson]:
        uids = sorted({study_uid(s) for s in studies})
        chunks = [uids[i : i + _UID_LIST_CHUNK] for i in range(0, len(uids), _UID_LIST_CHUNK)]
        results = await asyncio.gather(
            *(
                self._dicomweb.search_series(
                    {"StudyInstanceUID": ",".join(chunk)}, include_fields=SERIES_FIELDS
                )
                for chunk in chunks
            )
        )
        return [ds for batch in results for ds in batch]

    async def _plan(self, request: SearchRequest) -> StudySearchPlan:
        plan = StudySearchPlan()
        for clause in request.clauses:
            await _SEARCH_HANDLERS[clause.param.name](self, plan, clause)
        return plan

    # -- one handler per declared search parameter (_SEARCH_HANDLERS, checked at import) ---------

    async def _search_id(self, plan: StudySearchPlan, clause: SearchClause) -> None:
        self._require_uids(plan, uid_values(clause, ()))

    async def _search_identifier(self, plan: StudySearchPlan, clause: SearchClause) -> None:
        self._apply_identifier(plan, clause)

    async def _search_patient(self, plan: StudySearchPlan, clause: SearchClause) -> None:
        apply_patient_clause(plan, clause, self._ctx)

    async def _search_started(self, plan: StudySearchPlan, clause: SearchClause) -> None:
        apply_date_clause(plan, clause, "StudyDate", self._started, self._ctx.default_timezone)

    async def _search_modality(self, plan: StudySearchPlan, clause: SearchClause) -> None:
        self._apply_modality(plan, clause)

    async def _search_series(self, plan: StudySearchPlan, clause: SearchClause) -> None:
        uids = uid_values(clause, (UID_SYSTEM,))
        await self._require_studies_of(plan, "series", {"SeriesInstanceUID": uids})

    async def _search_instance(self, plan: StudySearchPlan, clause: SearchClause) -> None:
        uids = uid_values(clause, (UID_SYSTEM,))
        await self._require_studies_of(plan, "instances", {"SOPInstanceUID": uids})

    async def _search_dicom_class(self, plan: StudySearchPlan, clause: SearchClause) -> None:
        uids = uid_values(clause, (SOP_CLASS_SYSTEM,))
        await self._require_studies_of(plan, "instances", {"SOPClassUID": uids})

    async def _search_endpoint(self, plan: StudySearchPlan, clause: SearchClause) -> None:
        if not _names_wado_endpoint(clause):
            plan.match_nothing()

    async def _search_status(self, plan: StudySearchPlan, clause: SearchClause) -> None:
        if not _asks_available(clause):
            plan.match_nothing()

    def _started(self, ds: DicomJson) -> Any:
        return started_instant(
            _text(ds, "00080020"),
            _text(ds, "00080030"),
            _text(ds, "00080201"),
            self._ctx.default_timezone,
        )

    @staticmethod
    def _require_uids(plan: StudySearchPlan, uids: set[str]) -> None:
        if uids:
            plan.require(QidoQuery({"StudyInstanceUID": OneOf(frozenset(uids))}))
        else:
            plan.match_nothing()

    @staticmethod
    def _apply_identifier(plan: StudySearchPlan, clause: SearchClause) -> None:
        """Study UID (system urn:dicom:uid, or a urn:oid: value) or accession number (no system,
        or `:of-type` with type v2-0203 ACSN: search.html#token; the Study UID identifier has no
        type, so no other type matches)."""
        uids, accessions = set(), set()
        for value in clause.values:
            if isinstance(value, IdentifierOfType):
                if (value.type_system, value.type_code) == ACSN_TYPE:
                    accessions.add(value.value)
                continue
            assert isinstance(value, TokenValue)
            if not value.code:
                continue
            if value.system == UID_SYSTEM or (value.system is None and value.code.startswith("urn:oid:")):
                uids.add(strip_oid(value.code))
            elif value.system in (None, ""):
                accessions.add(value.code)
        options = []
        if uids:
            options.append(QidoQuery({"StudyInstanceUID": OneOf(frozenset(uids))}))
        if accessions:
            options.append(QidoQuery({"AccessionNumber": OneOf(frozenset(accessions))}))
        if options:
            plan.require_any(options)
        else:
            plan.match_nothing()

    @staticmethod
    def _apply_modality(plan: StudySearchPlan, clause: SearchClause) -> None:
        codes: set[str] = set()
        for value in clause.values:
            assert isinstance(value, TokenValue)
            if value.system not in (None, DCM_SYSTEM):
                continue
            if value.code is None:  # "DCM|": any modality
                return
            codes.add(value.code)
        if codes:
            plan.require(QidoQuery({"ModalitiesInStudy": OneOf(frozenset(codes))}))
        else:
            plan.match_nothing()

    async def _require_studies_of(
        self, plan: StudySearchPlan, level: str, query: dict[str, set[str]]
    ) -> None:
        """Resolve series/instance-level UIDs to their studies with one QIDO request."""
        ((keyword, uids),) = query.items()
        if not uids or not plan.alternatives:
            plan.match_nothing()
            return
        qido = {keyword: ",".join(sorted(uids))}
        search = self._dicomweb.search_series if level == "series" else self._dicomweb.search_instances
        rows = await search(qido)
        tag = dicom_tag(keyword)
        studies = {study_uid(r) for r in rows if {str(v) for v in tag_values(r, tag)} & uids}
        self._require_uids(plan, studies - {""})


#: The QIDO translation of each declared search parameter. A declared parameter without one fails
#: the import (check_search_handlers): it would be accepted and silently match everything.
_SEARCH_HANDLERS: dict[
    str, Callable[[ImagingStudyProvider, StudySearchPlan, SearchClause], Awaitable[None]]
] = {
    "_id": ImagingStudyProvider._search_id,
    "identifier": ImagingStudyProvider._search_identifier,
    "patient": ImagingStudyProvider._search_patient,
    "subject": ImagingStudyProvider._search_patient,
    "started": ImagingStudyProvider._search_started,
    "modality": ImagingStudyProvider._search_modality,
    "series": ImagingStudyProvider._search_series,
    "instance": ImagingStudyProvider._search_instance,
    "dicom-class": ImagingStudyProvider._search_dicom_class,
    "endpoint": ImagingStudyProvider._search_endpoint,
    "status": ImagingStudyProvider._search_status,
}
check_search_handlers("ImagingStudy", ImagingStudyProvider.search_params, _SEARCH_HANDLERS)


def _names_wado_endpoint(clause: SearchClause) -> bool:
    """Every study refers to the WADO-RS Endpoint and no other."""
    return any(
        isinstance(v, ReferenceValue) and v.id == WADO_ENDPOINT_ID and v.resource_type in (None, "Endpoint")
        for v in clause.values
    )


def _asks_available(clause: SearchClause) -> bool:
    """A study in the PACS is 'available'; no other status can match."""
    return any(
        isinstance(v, TokenValue) and v.code == "available" and v.system in (None, "", _STATUS_SYSTEM)
        for v in clause.values
    )


def _of_patient(datasets: list[DicomJson], study: DicomJson) -> list[DicomJson]:
    """The series or instances of `study`'s own patient. Orthanc keeps one StudyInstanceUID stored under
    two PatientIDs as two studies, but answers a series query by Study UID with the series of both, so
    the other patient's series would end up in this patient's ImagingStudy (and be readable through a
    token confined to this patient). Datasets that carry no PatientID are kept."""
    patient = _text(study, "00100020")
    return [ds for ds in datasets if _text(ds, "00100020") in (None, patient)]


def _text(ds: DicomJson, tag: str) -> str | None:
    values = tag_values(ds, tag)
    return str(values[0]) if values else None
