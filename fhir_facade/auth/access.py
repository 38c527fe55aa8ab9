"""Who is calling and what they may do: the one object every authorization decision reads.

The authenticating dependency (``fhir_facade.auth.dependency``) builds an ``Access`` once per request
from the bearer token and stores it twice: in ``request.state.access`` (read by outer middleware such
as audit, which runs outside the request's context) and in the ``current_access`` context variable
(read by the authorizing providers, which have no request object).

With FACADE_AUTH=none every request gets ``Access.unrestricted()``: the operator has said the network is
trusted, so nothing is checked, but audit still records the caller's address.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from dataclasses import dataclass, field

from starlette.requests import HTTPConnection

from fhir_facade.auth.scopes import Interaction, Scopes
from fhir_facade.fhir.errors import forbidden, unauthorized

__all__ = ["Access", "access_of", "authenticated_caller", "current_access"]


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

    def confinement(self, interaction: Interaction, resource_type: str) -> str | None:
        """The Patient id this interaction must be confined to, or None when it is not confined.

        Confined when only `patient/` scopes grant it: a `user/` or `system/` grant for the same
        interaction lifts the confinement. Call ``require`` first; a `patient/` grant without a patient
        context confines to nothing and so is refused here.
        """
        if not self.enforced:
            return None
        contexts = self.scopes.contexts_for(interaction, resource_type)
        if not contexts or contexts != {"patient"}:
            return None
        if not self.patient:
            raise forbidden(
                f"A patient/ scope grants {interaction.name.lower()} on {resource_type}, but the token "
                "has no patient context"
            )
        return self.patient

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
