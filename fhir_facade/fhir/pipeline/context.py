"""What one FHIR interaction is, said once: the typed context every pipeline stage receives.

HAPI FHIR hands each interceptor pointcut a `RequestDetails` (operation type, resource type, id,
the servlet request); this is that idea for the facade. A context describes the interaction, not
the HTTP request: a REST call, one entry of a transaction Bundle, a read made by an operation and an
internal call made on behalf of a client all produce the same context, so authorization, validation,
audit and the after-commit events see every path alike (docs/adr/0022-interaction-pipeline.md).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "Caller",
    "InteractionContext",
    "InteractionKind",
    "Origin",
    "current_origin",
    "enter_origin",
    "origin_scope",
]


class InteractionKind(enum.StrEnum):
    """The FHIR RESTful interactions a provider implements (R4 http.html)."""

    READ = "read"
    VREAD = "vread"
    SEARCH = "search-type"
    HISTORY = "history"
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"

    @property
    def writes(self) -> bool:
        return self in (InteractionKind.CREATE, InteractionKind.UPDATE, InteractionKind.DELETE)


class Origin(enum.StrEnum):
    """Where an interaction comes from. Stages that must treat paths differently ask this (the audit
    records REST requests per HTTP request, the others per interaction); none may skip a check."""

    REST = "rest"  # a request on the FHIR REST API
    BUNDLE_ENTRY = "bundle-entry"  # one entry of a batch or transaction Bundle
    OPERATION = "operation"  # a read or write an operation ($analyze) makes for its caller
    INTERNAL = "internal"  # work the server does on its own authority or on a client's behalf


_origin: ContextVar[Origin] = ContextVar("interaction_origin", default=Origin.REST)


def current_origin() -> Origin:
    """The origin of interactions started in the current context."""
    return _origin.get()


def enter_origin(origin: Origin) -> None:
    """Make `origin` the origin of the rest of the current context (a request dependency's way: an
    operation's route says once that what it does is the operation's)."""
    _origin.set(origin)


@contextmanager
def origin_scope(origin: Origin) -> Iterator[None]:
    """Interactions started inside the block come from `origin` (a Bundle's entries, a job)."""
    token = _origin.set(origin)
    try:
        yield
    finally:
        _origin.reset(token)


class Caller(Protocol):
    """Who an interaction is done for, as the pipeline needs to know it (auth.access.Access is one).
    `None` as a caller means the server itself."""

    @property
    def who(self) -> str: ...


@dataclass(frozen=True)
class InteractionContext:
    """One interaction: what is done to which resource, for whom, from where, under which id.

    `patient` is the patient context of the caller's launch (SMART `patient` claim), when it has one;
    `correlation_id` ties the interaction to its request's logs and AuditEvents.
    """

    kind: InteractionKind
    resource_type: str
    resource_id: str | None
    origin: Origin
    caller: Caller | None
    patient: str | None = None
    correlation_id: str | None = None

    @property
    def reference(self) -> str:
        """`Type/id`, or the type alone for a search or type history."""
        return f"{self.resource_type}/{self.resource_id}" if self.resource_id else self.resource_type
