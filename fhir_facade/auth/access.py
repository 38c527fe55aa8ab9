"""Who is calling and what they may do: the one object every authorization decision reads.

The authenticating dependency (``fhir_facade.auth.dependency``) builds an ``Access`` once per request
from the bearer token and stores it twice: in ``request.state.access`` (read by outer middleware such
as audit, which runs outside the request's context) and in the ``current_access`` context variable
(read by the authorizing providers, which have no request object).

With FACADE_AUTH=none every request gets ``Access.unrestricted()``: the operator has said the network is
trusted, so nothing is checked, but audit still records the caller's address.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import HTTPConnection

from fhir_facade.auth.errors import forbidden, unauthorized
from fhir_facade.auth.scopes import Interaction, Scopes, parse_scopes
from fhir_facade.store.authorship import WRITE_AUTHOR

__all__ = [
    "Access",
    "Confinement",
    "access_of",
    "acting_as",
    "authenticated_caller",
    "current_access",
    "enter_access",
]

#: The Patient ids a request is confined to; None: not confined (every patient).
Confinement = frozenset[str] | None


@dataclass(frozen=True)
class Access:
    """The caller's identity and grants for one request."""

    scopes: Scopes
    #: False only for FACADE_AUTH=none: no token was asked for, every interaction is allowed.
    enforced: bool = True
    client_id: str | None = None
    #: The token's `sub`: the user (or, for backend services, the client) the token was issued to.
    subject: str | None = None
    #: The SMART `fhirUser` claim, e.g. "Practitioner/123".
    fhir_user: str | None = None
    #: The SMART `patient` launch context: the Patient id that `patient/` scopes are confined to.
    patient: str | None = None
    #: The token's `jti`, when it has one (audit).
    token_id: str | None = None
    #: The patients a `user/` grant reaches: the signed-in user's compartments (the Patient ids the
    #: user directory lists for them). None: the user is not restricted to a list (an external issuer
    #: that narrows grants itself, or a user marked `all_patients`). Empty: no patient at all.
    user_patients: frozenset[str] | None = None
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def unrestricted(cls) -> Access:
        return cls(Scopes(), enforced=False)

    def allows(self, interaction: Interaction, resource_type: str) -> bool:
        return not self.enforced or self.scopes.allows(interaction, resource_type)

    def require(self, interaction: Interaction, resource_type: str) -> None:
        """Raise 403 insufficient_scope unless some scope grants `interaction` on `resource_type`."""
        if self.allows(interaction, resource_type):
            return
        needed = self.scopes.missing_scope_for(interaction, resource_type)
        raise forbidden(
            f"The access token does not permit {interaction.name.lower()} on {resource_type}; "
            f"a scope such as {needed} would",
            scope=needed,
        )

    def confinement(self, interaction: Interaction, resource_type: str) -> Confinement:
        """The Patient ids this interaction is confined to, or None when it is not confined.

        - a `system/` grant: not confined (backend services act for the organisation);
        - a `user/` grant: the user's compartments (``user_patients``), or None for an unrestricted
          user; a `user/` grant lifts a `patient/` grant's narrower confinement;
        - `patient/` grants only: the patient in the launch context (refused without one).

        Call ``require`` first.
        """
        if not self.enforced:
            return None
        contexts = self.scopes.contexts_for(interaction, resource_type)
        if not contexts or "system" in contexts:
            return None
        if "user" in contexts:
            return self.user_patients
        if not self.patient:
            raise forbidden(
                f"A patient/ scope grants {interaction.name.lower()} on {resource_type}, but the token "
                "has no patient context"
            )
        return frozenset({self.patient})

    def principal(self) -> str | None:
        """This caller as stored with what it writes (JSON), so that work done later on its behalf (the
        analysis worklist running a Task it requested) runs with its rights; None for the server itself
        and for FACADE_AUTH=none."""
        if not self.enforced:
            return None
        record: dict[str, Any] = {
            "scope": self.scopes.text,
            "client_id": self.client_id,
            "sub": self.subject,
            "fhirUser": self.fhir_user,
            "patient": self.patient,
            "user_patients": None if self.user_patients is None else sorted(self.user_patients),
        }
        return json.dumps({k: v for k, v in record.items() if v is not None}, separators=(",", ":"))

    @classmethod
    def from_principal(cls, principal: str) -> Access:
        """The Access recorded by ``principal``: the same grants and compartments as when it wrote."""
        record = json.loads(principal)
        patients = record.get("user_patients")
        return cls(
            parse_scopes(record.get("scope", "")),
            client_id=record.get("client_id"),
            subject=record.get("sub"),
            fhir_user=record.get("fhirUser"),
            patient=record.get("patient"),
            user_patients=None if patients is None else frozenset(patients),
        )

    def same_principal(self, other: Access) -> bool:
        """Whether `other` is the same client acting for the same user (idempotency keys are theirs)."""
        return (self.client_id, self.subject) == (other.client_id, other.subject)

    @property
    def who(self) -> str:
        """A short description of the caller for logs."""
        if not self.enforced:
            return "unauthenticated (FACADE_AUTH=none)"
        parts = [f"client={self.client_id}" if self.client_id else "client=?"]
        if self.fhir_user or self.subject:
            parts.append(f"user={self.fhir_user or self.subject}")
        if self.patient:
            parts.append(f"patient={self.patient}")
        return " ".join(parts)


#: The caller of the request being served; None outside a request (background work runs on the
#: server's own authority and does not go through the authorizing providers).
current_access: ContextVar[Access | None] = ContextVar("current_access", default=None)


def enter_access(access: Access) -> None:
    """Make `access` the caller of the current context: every authorization decision reads it, and
    every version the store writes in this context records it as its author."""
    current_access.set(access)
    WRITE_AUTHOR.set(access.principal())


@contextmanager
def acting_as(access: Access) -> Iterator[None]:
    """Run the enclosed work as `access` (background work done for a client, e.g. the analysis
    worklist running a Task the client requested), then restore the previous caller."""
    tokens = current_access.set(access), WRITE_AUTHOR.set(access.principal())
    try:
        yield
    finally:
        current_access.reset(tokens[0])
        WRITE_AUTHOR.reset(tokens[1])


@contextmanager
def on_server_authority() -> Iterator[None]:
    """Run the enclosed interactions as the server itself (no caller: the pipeline's authorization
    lets them through only as internal work), keeping the version author: what an authorized job
    writes as its result (the analyzer's report, Observations, Provenance) is still the client's."""
    token = current_access.set(None)
    try:
        yield
    finally:
        current_access.reset(token)


def access_of(connection: HTTPConnection) -> Access | None:
    """The Access the authenticating dependency stored on this request, if it ran."""
    return getattr(connection.state, "access", None)


def authenticated_caller() -> Access:
    """The current request's Access. 401 when none was set: a route or provider reached without the
    authenticating dependency fails closed rather than serving an unknown caller."""
    access = current_access.get()
    if access is None:
        logging.getLogger(__name__).error(
            "Reached without an authenticated caller (a route lacks the dependency)"
        )
        raise unauthorized("This request was not authenticated")
    return access
