"""The radiologist's agreement with the AI result (ADR 0034, issue 15 item 3).

When a report of a study turns `final` with an interpreter, and the study has an AI report (the
input of its newest reading Task, ADR 0033), the facade records, in the report's transaction:

- an Observation (code `ai-agreement` of the facade's CodeSystem ai-assessment) whose value is
  `agree`, `disagree` or `partial`: stated by the radiologist with the extension `AGREEMENT_EXTENSION`
  on the signed report (valueCode), or else derived by comparing the signed report's
  `conclusionCode` with the AI report's, restricted to the AI's code systems (no shared code
  system: not comparable, nothing is written). `focus` both reports, `partOf` the ImagingStudy,
  `derivedFrom` the AI finding Observation, `performer` the interpreter, components the AI class
  and the model id and version (so `$ai-performance` counts without further reads);
- a Provenance: target the signed report (this version) and the Observation, entity `source` the
  AI report (R4 provenance-entity-role "source": "a derivation ... from a source entity"),
  agent the interpreter (author).

R4 has no element for "a person assessed an AI output": R5's ArtifactAssessment (used so by the
HL7 Austria AIST trustworthy-AI IG, R5) has no R4 equivalent; IHE AIR puts AI results in DICOM SR
and leaves their assessment to the reading workflow. An Observation about the reports is the R4
way to record a clinician's judgement that can be searched and counted.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from fhir_facade.analyze.codes import IMAGING_CATEGORY
from fhir_facade.auth.access import on_server_authority
from fhir_facade.fhir.internal_search import SearchBuilder, read_or_none
from fhir_facade.fhir.pipeline import EventBus, Origin, origin_scope
from fhir_facade.fhir.pipeline.events import ResourceChanged
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.references import local_target
from fhir_facade.reading.codes import READ_CODE
from fhir_facade.reading.stage import SIGNED
from fhir_facade.reading.worklist import study_uid_of

__all__ = [
    "AGREEMENT_CODE",
    "AGREEMENT_EXTENSION",
    "AI_ASSESSMENT",
    "VERDICTS",
    "AgreementRecorder",
    "compare",
]

log = logging.getLogger(__name__)

#: The facade's CodeSystem (capability/CodeSystem-ai-assessment.json).
AI_ASSESSMENT = "http://fhir-facade.org/fhir/CodeSystem/ai-assessment"
AGREEMENT_CODE = {
    "system": AI_ASSESSMENT,
    "code": "ai-agreement",
    "display": "Radiologist's agreement with the AI result",
}
#: The radiologist's own statement on the signed report (valueCode agree|disagree|partial).
AGREEMENT_EXTENSION = "http://fhir-facade.org/fhir/StructureDefinition/ai-agreement"
VERDICTS = {
    "agree": "Agrees with the AI result",
    "disagree": "Disagrees with the AI result",
    "partial": "Partly agrees with the AI result",
}
_AI_INPUT_TYPE = {"text": "Preliminary AI report"}  # reading/worklist.py


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _codings(report: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (str(c.get("system")), str(c.get("code")))
        for concept in report.get("conclusionCode", [])
        for c in concept.get("coding", [])
        if c.get("system") and c.get("code")
    }


def compare(ai: set[tuple[str, str]], radiologist: set[tuple[str, str]]) -> str | None:
    """agree/disagree/partial on the radiologist's codes of the AI's code systems; None when the
    two share no code system (a RadLex report against a SNOMED CT finding is not compared)."""
    systems = {system for system, _ in ai}
    mine = {c for c in radiologist if c[0] in systems}
    if not ai or not mine:
        return None
    if mine == ai:
        return "agree"
    return "partial" if mine & ai else "disagree"


def stated(report: dict[str, Any]) -> str | None:
    """The radiologist's own verdict (AGREEMENT_EXTENSION), if given and one of VERDICTS."""
    for extension in report.get("extension", []):
        if extension.get("url") == AGREEMENT_EXTENSION and extension.get("valueCode") in VERDICTS:
            return str(extension["valueCode"])
    return None


def _concept(code: str) -> dict[str, Any]:
    return {"coding": [{"system": AI_ASSESSMENT, "code": code, "display": VERDICTS[code]}]}


def _component(code: str, display: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"code": {"coding": [{"system": AI_ASSESSMENT, "code": code, "display": display}]}, **value}


class AgreementRecorder:
    """Consumer of the event bus, inside the signed report's transaction (pipelined providers)."""

    def __init__(self, providers: dict[str, ResourceProvider], *, base_url: str) -> None:
        self._tasks = providers["Task"]
        self._reports = providers["DiagnosticReport"]
        self._observations = providers["Observation"]
        self._devices = providers["Device"]
        self._provenances = providers["Provenance"]
        self._base_url = base_url

    def subscribe(self, bus: EventBus) -> None:
        bus.subscribe(ResourceChanged, self.on_report, in_transaction=True)

    async def on_report(self, event: ResourceChanged) -> None:
        if event.resource_type != "DiagnosticReport" or event.after is None:
            return
        report = event.after
        if report.get("status") != "final" or (event.before or {}).get("status") in SIGNED:
            return
        interpreters = report.get("resultsInterpreter") or []
        study_uid = study_uid_of(report)
        if not interpreters or study_uid is None:
            return
        with on_server_authority(), origin_scope(Origin.INTERNAL):
            ai = await self._ai_report(study_uid, report, event.before)
            if ai is None:
                return
            verdict = stated(report)
            method = "Stated by the radiologist"
            if verdict is None:
                verdict = compare(_codings(ai), _codings(report))
                method = "Conclusion codes of the signed report compared with the AI report's"
            if verdict is None:
                log.info("DiagnosticReport/%s: no code comparable with the AI result", report["id"])
                return
            observation = await self._observations.create(
                await self._observation(report, ai, study_uid, verdict, method)
            )
            await self._provenances.create(self._provenance(report, ai, observation))
            log.info(
                "DiagnosticReport/%s %ss with AI DiagnosticReport/%s (Observation/%s)",
                report["id"],
                verdict,
                ai["id"],
                observation["id"],
            )

    async def _ai_report(
        self, study_uid: str, report: dict[str, Any], before: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        """The AI report the newest reading Task of the study was given (any status: the worklist
        may already have completed it in this transaction); its preliminary version when the
        radiologist signed the AI report itself."""
        search = (
            SearchBuilder(self._tasks, base_url=self._base_url)
            .where("focus", f"ImagingStudy/{study_uid}")
            .where_token("code", READ_CODE["system"], READ_CODE["code"])
            .sort("-_lastUpdated")
            .count(1)
        )
        for task in await search.matches():
            for item in task.get("input", []):
                if item.get("type") != _AI_INPUT_TYPE:
                    continue
                target = local_target(str((item.get("valueReference") or {}).get("reference", "")))
                if target is None or target[0] != "DiagnosticReport":
                    continue
                if target[1] == report["id"]:
                    return before
                return await read_or_none(self._reports, target[1])
        return None

    async def _observation(
        self, report: dict[str, Any], ai: dict[str, Any], study_uid: str, verdict: str, method: str
    ) -> dict[str, Any]:
        study = {"reference": f"ImagingStudy/{study_uid}"}
        observation: dict[str, Any] = {
            "resourceType": "Observation",
            "status": "final",
            "category": [{"coding": [IMAGING_CATEGORY]}],
            "code": {"coding": [AGREEMENT_CODE], "text": AGREEMENT_CODE["display"]},
            "partOf": [study],
            "focus": [
                {"reference": f"DiagnosticReport/{report['id']}"},
                {"reference": f"DiagnosticReport/{ai['id']}"},
            ],
            "effectiveDateTime": _now(),
            "issued": _now(),
            "performer": list(report["resultsInterpreter"]),
            "method": {"text": method},
            "valueCodeableConcept": _concept(verdict),
        }
        if report.get("subject"):
            observation["subject"] = report["subject"]
        components = [
            _component("ai-finding", "AI finding", {"valueCodeableConcept": concept})
            for concept in ai.get("conclusionCode", [])[:1]
        ]
        finding = None
        results = ai.get("result", [])
        if results:
            target = local_target(str(results[0].get("reference", "")))
            if target is not None and target[0] == "Observation":
                finding = await read_or_none(self._observations, target[1])
        if finding is not None:
            observation["derivedFrom"] = [{"reference": f"Observation/{finding['id']}"}, study]
            device_target = local_target(str((finding.get("device") or {}).get("reference", "")))
            device = await read_or_none(self._devices, device_target[1]) if device_target else None
            if device is not None:
                model = device.get("modelNumber") or device["id"]
                components.append(_component("ai-model", "AI model", {"valueString": model}))
                for version in device.get("version", [])[:1]:
                    components.append(
                        _component("ai-model-version", "AI model version", {"valueString": version["value"]})
                    )
        if components:
            observation["component"] = components
        return observation

    @staticmethod
    def _provenance(
        report: dict[str, Any], ai: dict[str, Any], observation: dict[str, Any]
    ) -> dict[str, Any]:
        version = (report.get("meta") or {}).get("versionId")
        signed = f"DiagnosticReport/{report['id']}" + (f"/_history/{version}" if version else "")
        return {
            "resourceType": "Provenance",
            "target": [{"reference": signed}, {"reference": f"Observation/{observation['id']}"}],
            "recorded": _now(),
            "activity": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                        "code": "UPDATE",
                        "display": "revise",
                    }
                ],
                "text": "Signed by the radiologist after the AI result",
            },
            "agent": [
                {
                    "type": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                "code": "author",
                                "display": "Author",
                            }
                        ]
                    },
                    "who": report["resultsInterpreter"][0],
                }
            ],
            "entity": [{"role": "source", "what": {"reference": f"DiagnosticReport/{ai['id']}"}}],
        }
