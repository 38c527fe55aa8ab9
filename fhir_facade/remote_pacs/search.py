"""Remote study search: a FHIR ImagingStudy search run as C-FIND on one remote node (ADR 0041).

`RemoteStudies` is an ImagingStudy provider for one node. It is wrapped by the interaction pipeline
like the local one, so the one authorization point (ADR 0009) confines it the same way: a
patient-confined caller's search gets the patient clause added (it becomes the C-FIND's PatientID)
and every answer is checked against the caller's compartment again.

The answers say where they live: `endpoint` names the node's Endpoint, `meta.tag` carries
study-location|remote, and the id is a UUID (v5 of node and Study UID), which never equals a local
id (a DICOM UID: digits and dots only), so a remote study is never mistaken for a local one.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from fhir_facade.dicom_to_fhir import MappingContext, imaging_study_from_dicom, started_instant
from fhir_facade.dicomweb import DicomJson
from fhir_facade.dicomweb.query import tag_values
from fhir_facade.embedded.remote_nodes import RemoteNode
from fhir_facade.fhir.bundles import SearchResult
from fhir_facade.fhir.errors import FhirError, Issue, not_found
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.search import SearchClause, SearchRequest
from fhir_facade.remote_pacs.orthanc_dimse import OrthancDimse
from fhir_facade.resources.dicom_search_terms import apply_date_clause, apply_patient_clause
from fhir_facade.resources.imaging_study import ImagingStudyProvider
from fhir_facade.resources.study_search import StudySearchPlan, dicom_tag, study_uid

__all__ = ["LOCATION_SYSTEM", "REMOTE_TAG", "RemoteStudies", "remote_study_id"]

LOCATION_SYSTEM = "http://fhir-facade.org/fhir/CodeSystem/study-location"
#: meta.tag of an ImagingStudy found on a remote node: it is not in the local PACS.
REMOTE_TAG = {"system": LOCATION_SYSTEM, "code": "remote", "display": "Not in the local PACS"}
_ID_NAMESPACE = uuid.UUID("5b0c1f3e-4a41-4e0f-9d55-3f1a2c6d7e80")
#: The ImagingStudy search parameters a C-FIND can answer (study-level keys, PS3.4 C.6.1.1.3).
_MAX_QUERIES = 16
REMOTE_PARAMS = ("_id", "identifier", "patient", "subject", "started", "modality")


def remote_study_id(node: str, uid: str) -> str:
    """The FHIR id of a study on a remote node: never a local id (those are DICOM UIDs)."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{node}|{uid}"))


class RemoteStudies(ResourceProvider):
    """ImagingStudy search on one remote node over C-FIND (read: `_id` search of that node)."""

    resource_type = "ImagingStudy"
    documentation = "ImagingStudy on a remote DICOM node (C-FIND through Orthanc)."
    search_params = tuple(p for p in ImagingStudyProvider.search_params if p.name in REMOTE_PARAMS)
    include_paths: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, node: RemoteNode, dimse: OrthancDimse, ctx: MappingContext) -> None:
        self.node = node
        self._dimse = dimse
        self._ctx = ctx

    async def read(self, resource_id: str) -> dict[str, Any]:
        raise not_found(f"ImagingStudy/{resource_id} is a remote study: search it with $query-remote")

    async def search(self, request: SearchRequest) -> SearchResult:
        plan = StudySearchPlan()
        wanted_ids: set[str] = set()
        for clause in request.clauses:
            if clause.param.name == "_id":
                wanted_ids |= {getattr(v, "code", None) or "" for v in clause.values}
                continue
            await _HANDLERS[clause.param.name](self, plan, clause)
        found: dict[str, dict[str, Any]] = {}
        for alternative in plan.alternatives:
            answers = [
                answer
                for query in c_find_queries(alternative.params(separator="\\"))
                for answer in await self._dimse.find_studies(self.node.name, query)
            ]
            for answer in answers:
                if not alternative.matches(answer, dicom_tag) or not all(
                    f(answer) for f in plan.post_filters
                ):
                    continue
                study = self._as_remote(answer)
                if study is not None and (not wanted_ids or study["id"] in wanted_ids):
                    found.setdefault(study["id"], study)
        matches = sorted(found.values(), key=lambda s: s.get("started", ""), reverse=True)
        page = matches[request.offset : request.offset + request.count]
        return SearchResult(page, len(matches), request.offset + request.count < len(matches))

    def _as_remote(self, answer: DicomJson) -> dict[str, Any] | None:
        uid = study_uid(answer)
        try:
            study = imaging_study_from_dicom(answer, [], None, self._ctx)
        except ValueError:
            return None  # an answer without a usable Study UID
        study["id"] = remote_study_id(self.node.name, uid)
        study["meta"] = {"tag": [dict(REMOTE_TAG)]}
        study["endpoint"] = [{"reference": f"Endpoint/{self.node.endpoint_id}", "display": self.node.name}]
        return study

    async def _identifier(self, plan: StudySearchPlan, clause: SearchClause) -> None:
        ImagingStudyProvider._apply_identifier(plan, clause)

    async def _patient(self, plan: StudySearchPlan, clause: SearchClause) -> None:
        apply_patient_clause(plan, clause, self._ctx)

    async def _started(self, plan: StudySearchPlan, clause: SearchClause) -> None:
        apply_date_clause(plan, clause, "StudyDate", self._instant, self._ctx.default_timezone)

    async def _modality(self, plan: StudySearchPlan, clause: SearchClause) -> None:
        ImagingStudyProvider._apply_modality(plan, clause)

    def _instant(self, ds: DicomJson) -> Any:
        def text(tag: str) -> str | None:
            values = tag_values(ds, tag)
            return str(values[0]) if values else None

        return started_instant(
            text("00080020"), text("00080030"), text("00080201"), self._ctx.default_timezone
        )


def c_find_queries(params: dict[str, str]) -> list[dict[str, str]]:
    """One query per combination of listed values of attributes that are not UIDs: C-FIND's list
    matching is defined for UIDs only (PS3.4 C.2.2.2.2), so `PatientID=a\\b` (a user with two
    patients) is two C-FINDs, not one another PACS may read as a literal value."""
    queries: list[dict[str, str]] = [{}]
    for key, value in params.items():
        options = [value] if key.endswith("UID") else value.split("\\")
        queries = [{**query, key: option} for query in queries for option in options]
    if len(queries) > _MAX_QUERIES:
        raise FhirError(
            400,
            [Issue("too-costly", f"The search expands to {len(queries)} C-FINDs; at most {_MAX_QUERIES}")],
        )
    return queries


_HANDLERS: dict[str, Callable[[RemoteStudies, StudySearchPlan, SearchClause], Awaitable[None]]] = {
    "identifier": RemoteStudies._identifier,
    "patient": RemoteStudies._patient,
    "subject": RemoteStudies._patient,
    "started": RemoteStudies._started,
    "modality": RemoteStudies._modality,
}
