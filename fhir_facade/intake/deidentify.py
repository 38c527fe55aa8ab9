"""`$deidentify` on ImagingStudy (operations/OperationDefinition-deidentify.json, ADR 0040).

The study is read through the authorizing ImagingStudy provider (another patient's study is a 404),
its series are retrieved over WADO-RS as stored, every instance goes through the PS3.15 Basic Profile
(`deidentify_profile`), and the result is sent by STOW-RS to a destination the operator named in
FACADE_DEIDENTIFY_DESTINATIONS (a request names the destination, never a URL: no request can make
the server post patient data to an address of its choosing). A Provenance records it, written
through the pipeline (authorized and audited like any write): the de-identified study (by its new
Study Instance UID, it lives in another store) is the target, the source study the entity.
Synchronous: up to FACADE_DEIDENTIFY_MAX_INSTANCES instances, one instance in memory per series
batch.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydicom.dataset import Dataset

from fhir_facade.auth.access import authenticated_caller
from fhir_facade.auth.errors import forbidden
from fhir_facade.auth.scopes import Interaction
from fhir_facade.config import DeidentifySettings
from fhir_facade.dicomweb.stow import StowClient
from fhir_facade.dicomweb.wado import WadoClient
from fhir_facade.fhir.errors import bad_request, error
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.intake.deidentify_profile import (
    OPTION_CODES,
    InstanceResult,
    Option,
    Pseudonyms,
    deidentify_dataset,
)

__all__ = ["DEIDENTIFY_OPERATION", "DEIDENTIFY_SCOPE", "Deidentifier", "DeidentifyRequest", "parse_request"]

DEIDENTIFY_OPERATION = {
    "name": "deidentify",
    "definition": "http://fhir-facade.org/fhir/OperationDefinition/deidentify",
}
#: The scope a token needs besides read on the study and create on Provenance (ADR 0040).
DEIDENTIFY_SCOPE = "deidentify"
_BATCH = 16  # instances per STOW-RS request


@dataclass(frozen=True)
class DeidentifyRequest:
    destination: str
    options: frozenset[Option]


def parse_request(body: dict[str, Any] | None) -> DeidentifyRequest:
    """`destination` (string, 1..1) and `option` (code, 0..*) from a Parameters resource; anything
    else is a 400 naming the parameter."""
    if body is None or body.get("resourceType") != "Parameters":
        raise bad_request("The body of $deidentify must be a Parameters resource", expression="resourceType")
    destination: str | None = None
    options: set[Option] = set()
    for index, parameter in enumerate(body.get("parameter", [])):
        name = parameter.get("name")
        where = f"Parameters.parameter[{index}]"
        if name == "destination" and isinstance(parameter.get("valueString"), str) and destination is None:
            destination = parameter["valueString"]
        elif name == "option" and parameter.get("valueCode") in set(Option):
            options.add(Option(parameter["valueCode"]))
        elif name in ("destination", "option"):
            expected = "one valueString" if name == "destination" else f"a valueCode of {', '.join(Option)}"
            raise bad_request(f"Parameter {name!r} needs {expected}", expression=where)
        else:
            raise bad_request(
                f"$deidentify has no parameter {name!r} (it takes destination, option)", expression=where
            )
    if destination is None:
        raise bad_request("$deidentify needs the parameter 'destination'", expression="Parameters.parameter")
    return DeidentifyRequest(destination, frozenset(options))


def check_deidentify_rights() -> None:
    """What `$deidentify` needs of the caller besides reading the study through the authorizing
    provider: create on Provenance (it writes one), a `user/` or `system/` grant to read
    ImagingStudy (an export for research is the organisation's act, not a patient app's), and the
    scope `deidentify`."""
    access = authenticated_caller()
    if not access.enforced:
        return
    access.require(Interaction.READ, "ImagingStudy")
    access.require(Interaction.CREATE, "Provenance")
    if access.scopes.contexts_for(Interaction.READ, "ImagingStudy") <= {"patient"}:
        raise forbidden(
            "$deidentify needs a user/ or system/ scope to read ImagingStudy", scope="system/ImagingStudy.rs"
        )
    if DEIDENTIFY_SCOPE not in access.scopes.other:
        raise forbidden(f"$deidentify needs the scope {DEIDENTIFY_SCOPE!r}", scope=DEIDENTIFY_SCOPE)


class Deidentifier:
    """The operation: retrieve, de-identify, store at the destination, record the Provenance."""

    def __init__(
        self,
        settings: DeidentifySettings,
        source: WadoClient,
        studies: ResourceProvider,
        provenances: ResourceProvider,
        base_url: str,
    ) -> None:
        assert settings.secret is not None  # Settings refuses enabled without one
        self._settings = settings
        self._keys = Pseudonyms(settings.secret.get_secret_value().encode())
        self._source = source
        self._studies = studies  # the pipelined provider: reads are authorized
        self._provenances = provenances
        self._base_url = base_url
        self._stores: dict[str, StowClient] = {}

    async def open(self) -> None:
        await self._source.open()

    async def close(self) -> None:
        await self._source.close()
        for store in self._stores.values():
            await store.close()

    def _store(self, name: str) -> StowClient:
        url = self._settings.destinations.get(name)
        if url is None:
            known = ", ".join(sorted(self._settings.destinations)) or "none configured"
            raise bad_request(
                f"Unknown destination {name!r} (FACADE_DEIDENTIFY_DESTINATIONS names: {known})",
                expression="Parameters.parameter",
            )
        if name not in self._stores:
            self._stores[name] = StowClient(url, timeout=self._settings.timeout)
        return self._stores[name]

    async def run(self, study_id: str, request: DeidentifyRequest) -> dict[str, Any]:
        """De-identify study `study_id` to `request.destination`; returns the output Parameters."""
        check_deidentify_rights()
        store = self._store(request.destination)
        study = await self._studies.read(study_id)  # 404 alike for missing and not the caller's
        count = int(study.get("numberOfInstances", 0))
        if count > self._settings.max_instances:
            raise error(
                422,
                "too-costly",
                f"The study has {count} instances; $deidentify handles at most "
                f"{self._settings.max_instances} (FACADE_DEIDENTIFY_MAX_INSTANCES)",
            )
        study_uid = _uid(study)
        results: list[InstanceResult] = []
        pseudonym = ""
        for series in study.get("series", []):
            batch: list[Dataset] = []
            async for ds in self._source.iter_series(study_uid, str(series["uid"])):
                result = deidentify_dataset(ds, self._keys, request.options)
                pseudonym = str(ds.get("PatientID", ""))
                results.append(result)
                batch.append(ds)
                if len(batch) == _BATCH:
                    await store.store(batch, result.study_instance_uid)
                    batch = []
            if batch:
                await store.store(batch, results[-1].study_instance_uid)
        new_uid = self._keys.uid(study_uid)
        provenance = await self._provenances.create(
            _provenance(study_id, new_uid, request, authenticated_caller().who)
        )
        return _output(new_uid, request, pseudonym, str(provenance["id"]), results)


def _uid(study: dict[str, Any]) -> str:
    for identifier in study.get("identifier", []):
        if identifier.get("system") == "urn:dicom:uid":
            return str(identifier["value"]).removeprefix("urn:oid:")
    return str(study["id"])


def _oid(uid: str) -> str:
    return f"urn:oid:{uid}"


def _provenance(study_id: str, new_uid: str, request: DeidentifyRequest, who: str) -> dict[str, Any]:
    """R4 Provenance: target the produced study, entity `source` the original; activity DEID (HL7 v3
    ActCode, ObligationPolicy "deidentify"); policy the PS3.15 profile and the CID 7050 options."""
    return {
        "resourceType": "Provenance",
        "id": uuid.uuid4().hex,
        "target": [
            {
                "type": "ImagingStudy",
                "identifier": {"system": "urn:dicom:uid", "value": _oid(new_uid)},
                "display": f"De-identified study at {request.destination}",
            }
        ],
        "recorded": datetime.now(UTC).isoformat(timespec="seconds"),
        "policy": [
            "http://dicom.nema.org/medical/dicom/current/output/chtml/part15/sect_E.2.html",
            *(
                f"http://dicom.nema.org/resources/ontology/DCM#{OPTION_CODES[o][0]}"
                for o in Option
                if o in request.options
            ),
        ],
        "activity": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                    "code": "DEID",
                    "display": "deidentify",
                },
                {
                    "system": "http://dicom.nema.org/resources/ontology/DCM",
                    "code": "113100",
                    "display": "Basic Application Confidentiality Profile",
                },
            ]
        },
        "agent": [
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                            "code": "performer",
                            "display": "Performer",
                        }
                    ]
                },
                "who": {"display": f"fhir-facade $deidentify for {who}"},
            }
        ],
        "entity": [{"role": "source", "what": {"reference": f"ImagingStudy/{study_id}"}}],
    }


def _output(
    new_uid: str,
    request: DeidentifyRequest,
    pseudonym: str,
    provenance_id: str,
    results: list[InstanceResult],
) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": "studyInstanceUid", "valueOid": _oid(new_uid)},
        {"name": "destination", "valueString": request.destination},
        {"name": "patientPseudonym", "valueString": pseudonym},
        {"name": "provenance", "valueReference": {"reference": f"Provenance/{provenance_id}"}},
        *({"name": "option", "valueCode": str(o)} for o in Option if o in request.options),
    ]
    for result in results:
        parts: list[dict[str, Any]] = [
            {"name": "source", "valueOid": _oid(result.source_sop_instance_uid)},
            {"name": "result", "valueOid": _oid(result.sop_instance_uid)},
            {"name": "series", "valueOid": _oid(result.series_instance_uid)},
            {"name": "burnedInAnnotation", "valueCode": result.burned_in_annotation},
            *({"name": "warning", "valueString": w} for w in result.warnings),
        ]
        parameters.append({"name": "instance", "part": parts})
    return {"resourceType": "Parameters", "parameter": parameters}
