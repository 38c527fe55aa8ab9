"""`$ai-performance` (operations/OperationDefinition-ai-performance.json, ADR 0034): how often the
radiologists agreed with each AI model, per model and version and per AI class.

`GET|POST /fhir/DiagnosticReport/$ai-performance` counts the `ai-agreement` Observations
(reading/agreement.py) the caller may search: it reads them through the pipelined Observation
provider with the caller's own rights (ADR 0009), so a patient-confined token counts only its
patient's. The answer is a Parameters resource (operations.html: an operation with several
outputs returns Parameters): one `model` parameter per model and version, with one `class` part
per AI class holding the counts of agree, disagree and partial.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from fastapi import APIRouter, Request, Response

from fhir_facade.fhir.internal_search import SearchBuilder
from fhir_facade.fhir.negotiation import negotiate_response_format
from fhir_facade.fhir.openapi import error_responses
from fhir_facade.fhir.pipeline import Origin, enter_origin
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.responses import fhir_response
from fhir_facade.reading.agreement import AGREEMENT_CODE, AI_ASSESSMENT, VERDICTS

__all__ = ["AI_PERFORMANCE_OPERATION", "MAX_ASSESSMENTS", "build_performance_router", "tally"]

AI_PERFORMANCE_OPERATION = {
    "name": "ai-performance",
    "definition": "http://fhir-facade.org/fhir/OperationDefinition/ai-performance",
}
#: The newest this many assessments are counted (one search page; the store's page limit).
MAX_ASSESSMENTS = 1000
_UNKNOWN = "unknown"

Key = tuple[str, str, tuple[str, str, str]]


def _component(observation: dict[str, Any], code: str) -> dict[str, Any] | None:
    for component in observation.get("component", []):
        if any(
            c.get("system") == AI_ASSESSMENT and c.get("code") == code
            for c in component.get("code", {}).get("coding", [])
        ):
            return dict(component)
    return None


def _key(observation: dict[str, Any]) -> Key | None:
    verdicts = [
        c.get("code")
        for c in observation.get("valueCodeableConcept", {}).get("coding", [])
        if c.get("system") == AI_ASSESSMENT
    ]
    if not verdicts or verdicts[0] not in VERDICTS:
        return None
    model = _component(observation, "ai-model")
    version = _component(observation, "ai-model-version")
    finding = _component(observation, "ai-finding")
    coding = ((finding or {}).get("valueCodeableConcept") or {}).get("coding") or [{}]
    first = coding[0]
    ai_class = (str(first.get("system", "")), str(first.get("code", _UNKNOWN)), str(first.get("display", "")))
    return (
        str((model or {}).get("valueString", _UNKNOWN)),
        str((version or {}).get("valueString", _UNKNOWN)),
        ai_class,
    )


def tally(observations: list[dict[str, Any]]) -> dict[str, Any]:
    """The Parameters resource of `$ai-performance` for these assessments."""
    counts: dict[tuple[str, str], dict[tuple[str, str, str], Counter[str]]] = {}
    for observation in observations:
        key = _key(observation)
        if key is None:
            continue
        model, version, ai_class = key
        verdict = observation["valueCodeableConcept"]["coding"][0]["code"]
        counts.setdefault((model, version), {}).setdefault(ai_class, Counter())[verdict] += 1
    parameters: list[dict[str, Any]] = []
    for (model, version), classes in sorted(counts.items()):
        parts: list[dict[str, Any]] = [
            {"name": "model", "valueString": model},
            {"name": "version", "valueString": version},
        ]
        for (system, code, display), counter in sorted(classes.items()):
            coding = {k: v for k, v in (("system", system), ("code", code), ("display", display)) if v}
            parts.append(
                {
                    "name": "class",
                    "part": [
                        {"name": "code", "valueCoding": coding},
                        *({"name": verdict, "valueInteger": counter[verdict]} for verdict in VERDICTS),
                        {"name": "total", "valueInteger": sum(counter.values())},
                    ],
                }
            )
        parameters.append({"name": "model", "part": parts})
    result: dict[str, Any] = {"resourceType": "Parameters"}
    if parameters:
        result["parameter"] = parameters
    return result


def build_performance_router(observations: ResourceProvider, base_url: str) -> APIRouter:
    """`observations`: the pipelined (authorizing) Observation provider."""
    router = APIRouter(prefix="/fhir")

    async def ai_performance(request: Request) -> Response:
        negotiate_response_format(request)
        enter_origin(Origin.OPERATION)
        search = (
            SearchBuilder(observations, base_url=base_url)
            .where_token("code", AGREEMENT_CODE["system"], AGREEMENT_CODE["code"])
            .sort("-_lastUpdated")
            .count(MAX_ASSESSMENTS)
        )
        return fhir_response(tally(await search.matches()), request)

    for method in ("GET", "POST"):
        router.add_api_route(
            "/DiagnosticReport/$ai-performance",
            ai_performance,
            methods=[method],
            summary="Agreement of the radiologists with each AI model "
            "(operations/OperationDefinition-ai-performance.json)",
            responses={200: {"content": {"application/fhir+json": {}}}, **error_responses(403)},
        )
    return router
