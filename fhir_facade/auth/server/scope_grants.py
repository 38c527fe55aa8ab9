"""What a client gets of the scopes it asks for: the request narrowed to its registration.

RFC 6749 3.3 lets the authorization server issue fewer scopes than requested (and then name them in
the token response). Resource scopes are intersected, not matched as strings: a client registered
for ``patient/*.rs`` that asks for ``patient/Observation.read`` gets ``patient/Observation.rs``; one
that asks for ``user/*.*`` with ``user/*.rs`` registered gets ``user/*.rs``; a ``?query`` on either
side narrows the result (search parameters are ANDed).

Some scopes are never granted, whatever the registration says:
- ``openid``: this server issues no OpenID Connect id_token, and granting ``openid`` would promise
  one (OIDC Core 3.1.3.3). ``fhirUser`` still puts the user's FHIR resource in the access token.
- ``online_access``/``offline_access`` are granted when registered and bring a refresh token
  (``refresh_tokens``, ADR 0047); a refresh may only narrow the grant (``covers``).
- ``launch``: except in an EHR launch (``ehr_launch=True``: the request carried a live ``launch``
  value for this client, ADR 0042), where it is granted when registered.

And context rules (SMART App Launch, scopes-and-launch-context):
- Backend services get ``system/`` scopes only, and nothing else (no user, no launch context).
- Apps get ``patient/`` and ``user/`` scopes; ``patient/`` scopes need a patient in context, so they
  are granted only together with ``launch/patient`` (the user then picks the patient) or, in an EHR
  launch, with ``launch`` (the patient comes from the launch context).
"""

from __future__ import annotations

from fhir_facade.auth.scopes import ResourceScope, Scopes, parse_scopes

__all__ = ["EHR_LAUNCH", "NEVER_GRANTED", "covers", "narrow_scopes"]

NEVER_GRANTED = frozenset({"openid", "launch"})
PATIENT_LAUNCH = "launch/patient"
EHR_LAUNCH = "launch"


def narrow_scopes(requested: str, registered: str, *, backend: bool, ehr_launch: bool = False) -> Scopes:
    """The part of ``requested`` that ``registered`` allows (possibly empty).

    Raises InvalidScope when ``requested`` is malformed (the caller answers ``invalid_scope``).
    """
    wanted = parse_scopes(requested)
    allowed = parse_scopes(registered)
    resources: list[ResourceScope] = []
    for want in wanted.resources:
        for have in allowed.resources:
            granted = _intersect(want, have)
            if granted is not None and granted not in resources:
                resources.append(granted)
    if backend:
        return Scopes(tuple(s for s in resources if s.context == "system"), ())
    never = NEVER_GRANTED - {EHR_LAUNCH} if ehr_launch else NEVER_GRANTED
    other = tuple(s for s in wanted.other if s in allowed.other and s not in never)
    resources = [s for s in resources if s.context != "system"]
    if PATIENT_LAUNCH not in other and EHR_LAUNCH not in other:
        resources = [s for s in resources if s.context != "patient"]
    return Scopes(tuple(resources), other)


def covers(granted: str, requested: str) -> bool:
    """Whether ``requested`` asks for nothing beyond ``granted`` (RFC 6749 6: the scope of a refresh
    must not include any scope not originally granted). Resource scopes compare by meaning, so
    ``patient/Observation.r`` is inside ``patient/*.rs``; other scopes by name.

    Raises InvalidScope when ``requested`` is malformed.
    """
    wanted = parse_scopes(requested)
    have = parse_scopes(granted)
    inside = all(any(_intersect(want, g) == want for g in have.resources) for want in wanted.resources)
    return inside and set(wanted.other) <= set(have.other)


def _intersect(want: ResourceScope, have: ResourceScope) -> ResourceScope | None:
    """The largest scope inside both, or None when they share nothing."""
    if want.context != have.context:
        return None
    if have.resource_type == "*":
        resource_type = want.resource_type
    elif want.resource_type in ("*", have.resource_type):
        resource_type = have.resource_type
    else:
        return None
    permissions = want.permissions & have.permissions
    if not permissions:
        return None
    query = tuple(sorted(set(want.query) | set(have.query)))
    return ResourceScope(want.context, resource_type, permissions, query)
