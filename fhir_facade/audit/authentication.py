"""The AuditEvent of a refused authentication at the built-in authorization server: a failed or
locked-out sign-in, or a failed or locked-out client authentication at the token endpoint. Pure, like
`event.audit_event`; the authorization server's routes hand the result to the one `AuditRecorder`.

Codes (DICOM PS3.16 CID 400 "Audit Event ID", CID 401 "Audit Event Type Code"; IHE BALP):
- type DCM 110114 "User Authentication" for both;
- subtype DCM 110122 "Login" for the sign-in form, and IHE ITI-71 "Get Access Token"
  (`urn:ihe:event-type-code`, as BALP's IHE.IUA.71 profile records a token request) for the token
  endpoint;
- action E, outcome 4 (the request was refused; R4 audit-event-outcome "Minor failure");
- agents: at sign-in the person (humanuser, `who.identifier` = the username as typed, requestor,
  with the network address) and the app that asked (DCM 110150 "Application", its client_id);
  at the token endpoint the client (110150, the client_id it claimed, requestor, network address)
  and the authorization server (extra-security-role-type `authserver`: R4 binds agent.type
  extensibly to participation-role-type, which has this code, so BALP's `AuthzOauthService` is not
  used; ADR 0019).
The password or client credential is never recorded.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final, Literal

from fhir_facade.audit.event import (
    _IP_ADDRESS,
    _SOURCE_TYPE,
    _USER_TYPE,
    CLIENT_ID_SYSTEM,
    audit_event_narrative,
    correlation_entity,
)
from fhir_facade.audit.interaction import DCM
from fhir_facade.fhir.narrative import with_narrative

__all__ = ["LOGIN_SUBTYPE", "TOKEN_SUBTYPE", "USER_AUTHENTICATION", "authentication_event"]

USER_AUTHENTICATION: Final = {"system": DCM, "code": "110114", "display": "User Authentication"}
LOGIN_SUBTYPE: Final = {"system": DCM, "code": "110122", "display": "Login"}
TOKEN_SUBTYPE: Final = {"system": "urn:ihe:event-type-code", "code": "ITI-71", "display": "Get Access Token"}
_APPLICATION: Final = {"system": DCM, "code": "110150", "display": "Application"}
_AUTH_SERVER: Final = {
    "system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
    "code": "authserver",
    "display": "authorization server",
}


def _network(address: str | None) -> dict[str, Any]:
    return {"network": {"address": address, "type": _IP_ADDRESS}} if address else {}


def _client(client_id: str | None, *, requestor: bool, address: str | None) -> dict[str, Any]:
    who: dict[str, Any] = (
        {"identifier": {"system": CLIENT_ID_SYSTEM, "value": client_id}, "display": client_id}
        if client_id
        else {"display": "no client_id sent"}
    )
    return {
        "type": {"coding": [dict(_APPLICATION)]},
        "who": who,
        "requestor": requestor,
        **(_network(address) if requestor else {}),
    }


def authentication_event(
    endpoint: Literal["sign-in", "token"],
    *,
    description: str,
    username: str | None,
    client_id: str | None,
    client_address: str | None,
    correlation_id: str | None,
    site: str,
    issuer: str,
    moment: datetime | None = None,
) -> dict[str, Any]:
    """The AuditEvent of one refused sign-in (``endpoint="sign-in"``, with the ``username`` typed) or
    token request (``"token"``, with the ``client_id`` claimed). ``description`` says what happened
    (outcomeDesc); ``issuer`` names the authorization server."""
    if not site:
        raise ValueError("site must name this server (e.g. its public root URL)")
    recorded = (moment or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="milliseconds")
    agents: list[dict[str, Any]]
    if endpoint == "sign-in":
        agents = [
            {
                "type": {"coding": [dict(_USER_TYPE)]},
                "who": {"identifier": {"value": username or ""}} if username else {"display": "no username"},
                "requestor": True,
                **_network(client_address),
            },
            _client(client_id, requestor=False, address=None),
        ]
        subtype = LOGIN_SUBTYPE
    else:
        agents = [
            _client(client_id, requestor=True, address=client_address),
            {
                "type": {"coding": [dict(_AUTH_SERVER)]},
                "who": {"identifier": {"value": issuer}, "display": issuer},
                "requestor": False,
            },
        ]
        subtype = TOKEN_SUBTYPE
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": dict(USER_AUTHENTICATION),
        "subtype": [dict(subtype)],
        "action": "E",
        "period": {"start": recorded, "end": recorded},
        "recorded": recorded,
        "outcome": "4",
        "outcomeDesc": description,
        "agent": agents,
        "source": {"site": site, "observer": {"display": f"fhir-facade {site}"}, "type": [_SOURCE_TYPE]},
    }
    if correlation_id:
        event["entity"] = [correlation_entity(correlation_id)]
    return with_narrative(event, audit_event_narrative(event))
