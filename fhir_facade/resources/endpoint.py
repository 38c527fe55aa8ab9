"""Endpoint: the PACS's DICOMweb services (WADO-RS, QIDO-RS, STOW-RS), one resource each, at the
address clients use: the facade's DICOMweb proxy (ADR 0016).

They are derived from configuration, so read and search are answered without a PACS request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fhir_facade.dicom_to_fhir import MappingContext, endpoints
from fhir_facade.fhir.search import (
    SearchClause,
    SearchParamDef,
    SearchParamType,
    StringValue,
    TokenValue,
)
from fhir_facade.resources.fixed_set import FixedSetProvider

__all__ = ["EndpointProvider"]

_SPEC = "http://hl7.org/fhir/SearchParameter/"
T = SearchParamType


def _codings(resource: dict[str, Any], name: str) -> list[dict[str, Any]]:
    value = resource.get(name)
    concepts = value if isinstance(value, list) else [value] if value else []
    if name == "connectionType":
        return concepts  # a Coding in R4
    return [c for concept in concepts for c in concept.get("coding", [])]


def _token_match(codings: list[dict[str, Any]], value: TokenValue) -> bool:
    return any(
        (value.code is None or c.get("code") == value.code)
        and (value.system is None or c.get("system", "") == value.system)
        for c in codings
    )


class EndpointProvider(FixedSetProvider):
    resource_type = "Endpoint"
    documentation = "The PACS's DICOMweb endpoints; ImagingStudy.endpoint refers to dicom-wado-rs."
    search_params = (
        SearchParamDef(
            "_id", T.TOKEN, "dicom-wado-rs | dicom-qido-rs | dicom-stow-rs", _SPEC + "Resource-id"
        ),
        SearchParamDef(
            "connection-type",
            T.TOKEN,
            "endpoint-connection-type code",
            _SPEC + "Endpoint-connection-type",
        ),
        SearchParamDef(
            "payload-type", T.TOKEN, "endpoint-payload-type code", _SPEC + "Endpoint-payload-type"
        ),
        SearchParamDef("status", T.TOKEN, "active", _SPEC + "Endpoint-status"),
        SearchParamDef("name", T.STRING, "Name starts with (case-insensitive)", _SPEC + "Endpoint-name"),
    )

    def __init__(self, ctx: MappingContext, extra: Sequence[dict[str, Any]] = ()) -> None:
        """`extra`: more Endpoints (the remote DICOM nodes', ADR 0041)."""
        super().__init__({e["id"]: e for e in (*endpoints(ctx), *extra)})

    def clause_matches(self, resource: dict[str, Any], clause: SearchClause) -> bool:
        return _clause_match(resource, clause)


def _clause_match(resource: dict[str, Any], clause: SearchClause) -> bool:
    name = clause.param.name
    for value in clause.values:
        if isinstance(value, StringValue):
            if resource.get("name", "").casefold().startswith(value.value.casefold()):
                return True
        elif isinstance(value, TokenValue):
            if name == "_id" and value.code == resource["id"]:
                return True
            if (
                name == "status"
                and value.code == resource["status"]
                and value.system in (None, "", "http://hl7.org/fhir/endpoint-status")
            ):
                return True
            if name == "connection-type" and _token_match(_codings(resource, "connectionType"), value):
                return True
            if name == "payload-type" and _token_match(_codings(resource, "payloadType"), value):
                return True
    return False
