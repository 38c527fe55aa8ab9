"""Patient, the DICOM view: computed live from the patient attributes of the studies in the PACS.

DICOMweb has no patient level (QIDO-RS searches studies, series and instances), so a Patient
search is a study search grouped by (PatientID, IssuerOfPatientID); paging happens here.

Patients an EHR creates (POST/PUT) are stored in the SQL store like the other persistent types.
Reads look there first, so a stored Patient shadows the DICOM view of the same id (the EHR's
record is the richer one); searches list stored matches first, then the DICOM view's.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from fhir_facade.dicom_to_fhir import MappingContext, parse_patient_resource_id, patient_from_dicom
from fhir_facade.dicomweb import DicomwebClient
from fhir_facade.dicomweb.query import OneOf, QidoQuery
from fhir_facade.fhir.bundles import SearchResult, paged
from fhir_facade.fhir.errors import FhirError, not_found
from fhir_facade.fhir.provider import ResourceProvider, WriteResult
from fhir_facade.fhir.registry import check_search_handlers
from fhir_facade.fhir.search import (
    ReferenceValue,
    SearchClause,
    SearchParamDef,
    SearchParamType,
    SearchRequest,
    StringValue,
    TokenValue,
)
from fhir_facade.resources.dicom_search_terms import apply_date_clause, apply_patient_clause
from fhir_facade.resources.study_search import StudySearchPlan, find_all_studies

__all__ = ["PatientProvider"]

_SPEC = "http://hl7.org/fhir/SearchParameter/"
T = SearchParamType
PATIENT_FIELDS = ("00100021",)
_GENDERS = {"male": "M", "female": "F", "other": "O"}
_GENDER_SYSTEM = "http://hl7.org/fhir/administrative-gender"
#: An exact test on a mapped Patient, for what QIDO cannot match (PatientName, query.py).
PatientCheck = Callable[[dict[str, Any]], bool]


def _fold(text: str) -> str:
    """Case- and accent-insensitive form for string search (FHIR search.html#string)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def _name_parts(patient: dict[str, Any]) -> list[str]:
    parts: list[str] = []
    for name in patient.get("name", []):
        parts += [name.get("family", ""), name.get("text", "")]
        parts += name.get("given", []) + name.get("prefix", []) + name.get("suffix", [])
    return [p for p in parts if p]


class PatientProvider(ResourceProvider):
    resource_type = "Patient"
    documentation = (
        "Virtual DICOM view of patients in the PACS; id = PatientID, or an encoded "
        "PatientID+IssuerOfPatientID (see docs/adr/0003-patient-identity.md)."
    )
    search_params = (
        SearchParamDef("_id", T.TOKEN, "Patient id", _SPEC + "Resource-id"),
        SearchParamDef("identifier", T.TOKEN, "system|PatientID (MRN)", _SPEC + "Patient-identifier"),
        SearchParamDef(
            "name",
            T.STRING,
            "Any part of the name; starts-with, case/accent-insensitive",
            _SPEC + "Patient-name",
            modifiers=frozenset({"exact", "contains"}),
        ),
        SearchParamDef("birthdate", T.DATE, "PatientBirthDate", _SPEC + "individual-birthdate"),
        SearchParamDef(
            "gender",
            T.TOKEN,
            "male | female | other (PatientSex M/F/O)",
            _SPEC + "individual-gender",
        ),
    )

    #: Stored Patients found by one search at most (the DICOM view is searched in full as well).
    RECORD_SEARCH_LIMIT = 1000

    def __init__(
        self, dicomweb: DicomwebClient, ctx: MappingContext, records: ResourceProvider | None = None
    ) -> None:
        self._dicomweb = dicomweb
        self._ctx = ctx
        self._records = records

    @property
    def interactions(self) -> tuple[str, ...]:
        return self._records.interactions if self._records else super().interactions

    # -- Patients an EHR created: stored, and they win over the DICOM view of the same id ---------

    async def create(self, resource: dict[str, Any]) -> dict[str, Any]:
        if self._records is None:
            return await super().create(resource)
        return await self._records.create(resource)

    async def update(
        self, resource_id: str, resource: dict[str, Any], *, if_match: str | None
    ) -> WriteResult:
        if self._records is None:
            return await super().update(resource_id, resource, if_match=if_match)
        return await self._records.update(resource_id, resource, if_match=if_match)

    async def delete(self, resource_id: str) -> None:
        if self._records is None:
            return await super().delete(resource_id)
        await self._records.delete(resource_id)

    async def vread(self, resource_id: str, version_id: str) -> dict[str, Any]:
        if self._records is None:
            return await super().vread(resource_id, version_id)
        return await self._records.vread(resource_id, version_id)

    async def history(
        self, resource_id: str | None, count: int, offset: int
    ) -> tuple[list[dict[str, Any]], int]:
        if self._records is None:
            return await super().history(resource_id, count, offset)
        return await self._records.history(resource_id, count, offset)

    async def read(self, resource_id: str) -> dict[str, Any]:
        if self._records is not None:
            try:
                return await self._records.read(resource_id)
            except FhirError as error:
                if error.status != 404:
                    raise  # 410: the EHR deleted it
        return await self._read_dicom(resource_id)

    async def _read_dicom(self, resource_id: str) -> dict[str, Any]:
        try:
            parse_patient_resource_id(resource_id)
        except ValueError as exc:
            raise not_found(f"Patient/{resource_id} is not a valid DICOM patient id") from exc
        plan = StudySearchPlan()
        apply_patient_clause(plan, _reference_clause(self, resource_id), self._ctx)
        studies = await find_all_studies(self._dicomweb, plan, PATIENT_FIELDS)
        for ds in studies:
            patient = patient_from_dicom(ds, self._ctx)
            if patient and patient["id"] == resource_id:
                return patient
        raise not_found(f"Patient/{resource_id} has no studies in the PACS")

    async def search(self, request: SearchRequest) -> SearchResult:
        """Stored Patients first (by id), then the DICOM view's patients not shadowed by one."""
        records: list[dict[str, Any]] = []
        if self._records is not None:
            everything = replace(request, offset=0, count=self.RECORD_SEARCH_LIMIT, total="accurate")
            records = (await self._records.search(everything)).matches
        stored_ids = {r["id"] for r in records}
        dicom = [p for p in await self._search_dicom(request) if p["id"] not in stored_ids]
        return paged([*records, *dicom], request)

    async def _search_dicom(self, request: SearchRequest) -> list[dict[str, Any]]:
        plan = StudySearchPlan()
        resource_checks: list[PatientCheck] = []
        for clause in request.clauses:
            _SEARCH_HANDLERS[clause.param.name](self, plan, clause, resource_checks)
        studies = await find_all_studies(self._dicomweb, plan, PATIENT_FIELDS)
        patients: dict[str, dict[str, Any]] = {}
        for ds in studies:
            patient = patient_from_dicom(ds, self._ctx)
            # A patient whose (issuer, PatientID) encodes to more than 64 characters has no id: a
            # search-set entry needs one (its fullUrl), so it is left out rather than failing.
            if patient and "id" in patient and all(check(patient) for check in resource_checks):
                patients.setdefault(patient["id"], patient)
        return [patients[k] for k in sorted(patients)]

    # -- one handler per declared search parameter (_SEARCH_HANDLERS, checked at import) ---------

    def _search_patient_id(
        self, plan: StudySearchPlan, clause: SearchClause, checks: list[PatientCheck]
    ) -> None:
        """`_id` and `identifier`: the same filters as a patient reference on studies."""
        apply_patient_clause(plan, _as_reference_clause(clause), self._ctx)

    def _search_birthdate(
        self, plan: StudySearchPlan, clause: SearchClause, checks: list[PatientCheck]
    ) -> None:
        apply_date_clause(plan, clause, "PatientBirthDate", lambda ds: None, self._ctx.default_timezone)

    def _search_gender(self, plan: StudySearchPlan, clause: SearchClause, checks: list[PatientCheck]) -> None:
        codes = {
            _GENDERS[v.code]
            for v in clause.values
            if isinstance(v, TokenValue) and v.code in _GENDERS and v.system in (None, _GENDER_SYSTEM)
        }
        if codes:
            plan.require(QidoQuery({"PatientSex": OneOf(frozenset(codes))}))
        else:
            plan.match_nothing()

    def _search_name(self, plan: StudySearchPlan, clause: SearchClause, checks: list[PatientCheck]) -> None:
        checks.append(self._apply_name(clause))

    @staticmethod
    def _apply_name(clause: SearchClause) -> PatientCheck:
        """FHIR string semantics (default starts-with any name part, :contains, :exact) on the
        mapped names. Not sent to QIDO: Orthanc's QIDO does not match PatientName (query.py)."""
        texts = [v.value for v in clause.values if isinstance(v, StringValue)]

        def check(patient: dict[str, Any]) -> bool:
            parts = _name_parts(patient)
            if clause.modifier == "exact":
                return any(p == t for p in parts for t in texts)
            folded = [_fold(p) for p in parts]
            wanted = [_fold(t) for t in texts]
            if clause.modifier == "contains":
                return any(w in p for p in folded for w in wanted)
            return any(
                p.startswith(w) or any(word.startswith(w) for word in p.split())
                for p in folded
                for w in wanted
            )

        return check


#: The QIDO translation (or exact check on the mapped Patient) of each declared search parameter.
#: A declared parameter without one fails the import (check_search_handlers).
_SEARCH_HANDLERS: dict[
    str, Callable[[PatientProvider, StudySearchPlan, SearchClause, list[PatientCheck]], None]
] = {
    "_id": PatientProvider._search_patient_id,
    "identifier": PatientProvider._search_patient_id,
    "birthdate": PatientProvider._search_birthdate,
    "gender": PatientProvider._search_gender,
    "name": PatientProvider._search_name,
}
check_search_handlers("Patient", PatientProvider.search_params, _SEARCH_HANDLERS)


def _reference_clause(provider: PatientProvider, resource_id: str) -> SearchClause:
    param = provider.search_param_map["_id"]
    return SearchClause(param, None, (ReferenceValue("Patient", resource_id),), "_id", resource_id)


def _as_reference_clause(clause: SearchClause) -> SearchClause:
    """`_id=x` and `identifier=s|v` on Patient are the same filters as a patient reference."""
    values: list[ReferenceValue] = []
    for value in clause.values:
        assert isinstance(value, TokenValue)
        if value.code is None:
            continue
        if clause.param.name == "_id":
            values.append(ReferenceValue("Patient", value.code))
        else:
            values.append(ReferenceValue(identifier=TokenValue(value.system or None, value.code)))
    return SearchClause(clause.param, None, tuple(values), clause.raw_name, clause.raw_value)
