"""Orthanc's REST API for remote modalities: C-FIND, C-MOVE and the jobs that run them.

- `POST /modalities/{name}/query` runs a C-FIND (Orthanc as SCU) and keeps the answers under
  `/queries/{id}`; `/queries/{id}/answers/{i}/content?simplify` is one answer, keyword -> value.
- `POST /queries/{id}/retrieve` with `Asynchronous: true` starts a C-MOVE job; `/jobs/{id}` has its
  `State` (Pending, Running, Success, Failure...) and `Progress` (0-100).
  https://orthanc.uclouvain.be/book/users/rest.html#query-retrieve-and-find-with-rest
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from pydicom.dataset import Dataset

from fhir_facade.dicomweb import DicomJson
from fhir_facade.dicomweb.errors import DicomwebError
from fhir_facade.dicomweb.orthanc_rest import OrthancRestClient

__all__ = ["STUDY_RETURN_KEYS", "OrthancDimse"]

#: The study-level return keys asked of the remote node (empty value = "return it", PS3.4 C.2.2.1.3).
STUDY_RETURN_KEYS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
_MULTI_VALUED = {"ModalitiesInStudy"}
_MAX_ANSWERS = 1000  # one remote search reads at most this many answers


class OrthancDimse(OrthancRestClient):
    """Remote-modality operations of Orthanc on the facade's shared Orthanc connection pool."""

    async def find_studies(self, modality: str, query: Mapping[str, str]) -> list[DicomJson]:
        """C-FIND at study level on `modality` (an Orthanc modality name) with `query` (keyword ->
        C-FIND value; lists joined by backslash); the answers as DICOM JSON (PS3.18 F)."""
        keys = {key: "" for key in STUDY_RETURN_KEYS}
        keys.update(query)
        body = {"Level": "Study", "Query": keys, "Normalize": False}
        response = await self._send("POST", f"/modalities/{modality}/query", json=body)
        if response.status_code >= 400:
            raise DicomwebError(f"Orthanc rejected the C-FIND on {modality} with {response.status_code}")
        query_id = str(response.json()["ID"])
        try:
            indices = await self._get_json(f"/queries/{query_id}/answers")
            if not isinstance(indices, list):
                raise DicomwebError("Orthanc /queries/{id}/answers did not return a list")
            answers = await asyncio.gather(
                *(
                    self._get_object(f"/queries/{query_id}/answers/{index}/content", {"simplify": ""})
                    for index in indices[:_MAX_ANSWERS]
                )
            )
        finally:
            await self._send("DELETE", f"/queries/{query_id}")
        return [_dicom_json(answer) for answer in answers if answer]

    async def move_study(self, modality: str, study_uid: str, target_aet: str) -> str:
        """Ask `modality` to C-MOVE the study to `target_aet` (our Orthanc), as an Orthanc job; its id.

        Orthanc 1.10 runs `/modalities/{name}/move` synchronously (its answer is `{}`, checked), so the
        move goes through a C-FIND of the study and `/queries/{id}/retrieve`, which submits a job
        when `Asynchronous` is set. The query is left to Orthanc's own expiry: the job uses it."""
        body = {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}, "Normalize": False}
        response = await self._send("POST", f"/modalities/{modality}/query", json=body)
        if response.status_code >= 400:
            raise DicomwebError(f"Orthanc rejected the C-FIND on {modality} with {response.status_code}")
        query_id = str(response.json()["ID"])
        move = {"TargetAet": target_aet, "Asynchronous": True}
        response = await self._send("POST", f"/queries/{query_id}/retrieve", json=move)
        if response.status_code >= 400:
            raise DicomwebError(f"Orthanc rejected the C-MOVE from {modality} with {response.status_code}")
        answer = response.json()
        if not isinstance(answer, dict) or "ID" not in answer:
            raise DicomwebError(f"Orthanc started no C-MOVE job: {str(answer)[:200]}")
        return str(answer["ID"])

    async def job(self, job_id: str) -> dict[str, Any] | None:
        """An Orthanc job (`GET /jobs/{id}`): State, Progress, ErrorCode, ErrorDescription."""
        return await self._get_object(f"/jobs/{job_id}")

    async def local_instance_count(self, study_uid: str) -> int:
        """Instances of the study in the local Orthanc (progress of a retrieve as it arrives)."""
        body = {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}
        response = await self._send("POST", "/tools/find", json=body)
        if response.status_code >= 400:
            raise DicomwebError(f"Orthanc rejected /tools/find with {response.status_code}")
        found = response.json()
        return len(found) if isinstance(found, list) else 0


def _dicom_json(simplified: Mapping[str, Any]) -> DicomJson:
    """Orthanc's simplified answer (keyword -> string) as DICOM JSON, with VRs from pydicom's
    dictionary; unknown keywords and sequences are left out."""
    ds = Dataset()
    for keyword, value in simplified.items():
        if not isinstance(value, str) or not value:
            continue
        try:
            setattr(ds, keyword, value.split("\\") if keyword in _MULTI_VALUED or "\\" in value else value)
        except (AttributeError, ValueError, TypeError):
            continue
    try:
        return dict(ds.to_json_dict())
    except (ValueError, TypeError) as exc:
        raise DicomwebError(f"A C-FIND answer could not be read as DICOM: {exc}") from exc
