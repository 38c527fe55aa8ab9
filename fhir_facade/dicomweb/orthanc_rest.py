"""Orthanc's own REST API, for what DICOMweb cannot do cheaply (FACADE_ORTHANC_URL).

Counting: QIDO-RS has no count, so an exact `Bundle.total` over QIDO means fetching every match
in DICOM JSON (about 90 ms for 120 studies here). Orthanc's `/tools/find` runs the same lookup and
returns its index entries (about 18 ms for the same 120 with `Expand: true`, measured; ADR 0002).

Arrivals: DICOMweb has no notification of new studies; Orthanc's `/changes` feed does (REST API,
https://orthanc.uclouvain.be/book/users/rest.html#tracking-changes). The study-arrival watcher
(fhir_facade.watcher) reads it through `changes`, `study`, `study_series` and `study_patient_module`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from fhir_facade.dicomweb.errors import DicomwebError
from fhir_facade.dicomweb.pooled_client import PooledClient

__all__ = ["Change", "ChangesPage", "OrthancRestClient"]


@dataclass(frozen=True)
class Change:
    """One entry of Orthanc's change log (`GET /changes`): `change_type` is e.g. "NewInstance",
    "StableSeries", "StableStudy"; `orthanc_id` is Orthanc's own id of the resource (not a UID)."""

    seq: int
    change_type: str
    resource_type: str
    orthanc_id: str


@dataclass(frozen=True)
class ChangesPage:
    """One page of the change log.

    Orthanc 1.10.1 (checked): `last` is the `Seq` of the last change in the page; on an empty page
    it is the newest `Seq` of the whole log, which can be *below* the `since` that was asked for
    when the Orthanc database was replaced. `done` is true when no change after `last` exists yet.
    """

    changes: list[Change]
    done: bool
    last: int


class OrthancRestClient(PooledClient):
    """A minimal async client of the Orthanc REST API on one shared connection pool."""

    service_name = "Orthanc"

    async def count_studies(self, query: Mapping[str, str]) -> int:
        """Number of distinct Study Instance UIDs matching a C-FIND style query (lists joined by
        backslash). Orthanc keys a study by PatientID + UID, so ids alone would count a UID stored
        under two patients twice: hence `Expand` and counting UIDs."""
        body = {"Level": "Study", "Query": dict(query), "Expand": True}
        response = await self._send("POST", "/tools/find", json=body)
        if response.status_code >= 400:
            raise DicomwebError(f"Orthanc rejected /tools/find with {response.status_code}")
        studies = response.json()
        if not isinstance(studies, list):
            raise DicomwebError("Orthanc /tools/find did not return a list")
        return len({s.get("MainDicomTags", {}).get("StudyInstanceUID") for s in studies} - {None})

    async def changes(self, since: int, limit: int) -> ChangesPage:
        """Changes with `Seq` > `since`, oldest first, at most `limit` (`GET /changes?since&limit`,
        https://orthanc.uclouvain.be/book/users/rest.html#tracking-changes). Sequence numbers are
        Orthanc's database row ids: increasing, never reused by the same database."""
        if since < 0 or limit < 1:
            raise ValueError(f"since must be >= 0 and limit >= 1, got since={since}, limit={limit}")
        response = await self._get("/changes", {"since": str(since), "limit": str(limit)})
        if response.status_code >= 400:
            raise DicomwebError(f"Orthanc rejected /changes with {response.status_code}")
        return _changes_page(response.json())

    async def latest_change_seq(self) -> int:
        """The newest `Seq` of the change log, 0 when it is empty (`GET /changes?last`), for a
        consumer that wants to start at "now" instead of replaying the whole log."""
        response = await self._get("/changes", {"last": ""})
        if response.status_code >= 400:
            raise DicomwebError(f"Orthanc rejected /changes?last with {response.status_code}")
        return _changes_page(response.json()).last

    async def study(self, orthanc_id: str) -> dict[str, Any] | None:
        """A study's index entry (`GET /studies/{id}`): `MainDicomTags` (StudyInstanceUID,
        AccessionNumber...), `PatientMainDicomTags`, `Series` (Orthanc ids). None when Orthanc does
        not know the id (404): a study deleted after its change was logged is normal, not an error."""
        return await self._get_object(f"/studies/{orthanc_id}")

    async def study_series(self, orthanc_id: str) -> list[dict[str, Any]] | None:
        """Every series of a study, expanded, in one request (`GET /studies/{id}/series`): each has
        `MainDicomTags.Modality`. Orthanc 1.10.1 does not keep ModalitiesInStudy in the study's
        MainDicomTags (checked), so this is where a study's modalities come from. None on 404."""
        body = await self._get_json(f"/studies/{orthanc_id}/series")
        if body is None:
            return None
        if not isinstance(body, list) or not all(isinstance(s, dict) for s in body):
            raise DicomwebError(f"Orthanc /studies/{orthanc_id}/series did not return a list of series")
        return body

    async def study_patient_module(self, orthanc_id: str) -> dict[str, Any] | None:
        """The Patient module of one instance of the study, simplified to keyword -> value
        (`GET /studies/{id}/module-patient?simplify`). Needed for IssuerOfPatientID, which is not
        one of Orthanc's patient MainDicomTags; Orthanc reads a single stored file for it. None on 404."""
        return await self._get_object(f"/studies/{orthanc_id}/module-patient", {"simplify": ""})

    async def lookup_study(self, study_uid: str) -> list[str]:
        """Orthanc's ids of the study with this Study Instance UID (`POST /tools/lookup`; several when
        the UID is stored under several patients)."""
        response = await self._send("POST", "/tools/lookup", content=study_uid.encode())
        if response.status_code >= 400:
            raise DicomwebError(f"Orthanc rejected /tools/lookup with {response.status_code}")
        found = response.json()
        if not isinstance(found, list):
            raise DicomwebError("Orthanc /tools/lookup did not return a list")
        return [str(f["ID"]) for f in found if isinstance(f, dict) and f.get("Type") == "Study"]

    async def delete_study(self, orthanc_id: str) -> bool:
        """Delete a study and all its files (`DELETE /studies/{id}`); False when Orthanc had none."""
        response = await self._send("DELETE", f"/studies/{orthanc_id}")
        if response.status_code == 404:
            return False
        if response.status_code >= 400:
            raise DicomwebError(f"Orthanc rejected DELETE /studies/{orthanc_id} with {response.status_code}")
        return True

    async def _get_object(self, path: str, params: Mapping[str, str] | None = None) -> dict[str, Any] | None:
        body = await self._get_json(path, params)
        if body is not None and not isinstance(body, dict):
            raise DicomwebError(f"Orthanc {path} did not return a JSON object")
        return body

    async def _get_json(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """The JSON body of a GET, None on 404; other 4xx are DicomwebError."""
        response = await self._get(path, params)
        if response.status_code == 404:
            return None
        if response.status_code >= 400:
            raise DicomwebError(f"Orthanc rejected {path} with {response.status_code}")
        try:
            return response.json()
        except ValueError as exc:
            raise DicomwebError(f"Orthanc answered {path} with invalid JSON") from exc

    async def _get(self, path: str, params: Mapping[str, str] | None = None) -> httpx.Response:
        """A GET; the caller judges 4xx (5xx and transport failures raise DicomwebUnavailable)."""
        return await self._send("GET", path, params=dict(params or {}))


def _changes_page(body: Any) -> ChangesPage:
    """Parse a `/changes` answer, naming what is malformed."""
    try:
        changes = [
            Change(
                seq=int(entry["Seq"]),
                change_type=str(entry["ChangeType"]),
                resource_type=str(entry["ResourceType"]),
                orthanc_id=str(entry["ID"]),
            )
            for entry in body["Changes"]
        ]
        return ChangesPage(changes=changes, done=bool(body["Done"]), last=int(body["Last"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise DicomwebError(f"Orthanc /changes answer is malformed: {exc!r}") from exc
