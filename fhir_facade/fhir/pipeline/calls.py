"""The interactions as values: what a stage may look at before deciding to let one through.

Each call carries its arguments and knows the provider that will answer it, so a stage can ask for
the resource as it stands (`await call.current()`, read once and shared by every stage) without
calling the provider itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from fhir_facade.fhir.errors import FhirError
from fhir_facade.fhir.pipeline.context import InteractionKind
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.search import SearchRequest

__all__ = ["Call", "Create", "Delete", "History", "Read", "Search", "Update", "Vread"]

_UNREAD = object()


@dataclass
class Call:
    """One interaction on `provider` (the provider being wrapped, never a pipelined one) about the
    resource `id` (None for a search, a create, a type history)."""

    kind: ClassVar[InteractionKind]
    provider: ResourceProvider
    id: str | None = None
    _current: Any = field(default=_UNREAD, init=False, repr=False)

    @property
    def named_id(self) -> str:
        """`id`, for the interactions that always name one (read, vread, update, delete)."""
        if self.id is None:
            raise TypeError(f"A {self.kind} interaction names its resource")
        return self.id

    async def current(self) -> dict[str, Any] | None:
        """The resource as stored now, None if it does not exist or is deleted (read once)."""
        if self._current is _UNREAD:
            self._current = None
            if self.id is not None:
                try:
                    self._current = await self.provider.read(self.id)
                except FhirError as error:
                    if error.status not in (404, 410):
                        raise
        return self._current


@dataclass
class Read(Call):
    kind: ClassVar[InteractionKind] = InteractionKind.READ


@dataclass
class Vread(Call):
    kind: ClassVar[InteractionKind] = InteractionKind.VREAD
    version_id: str = ""


@dataclass
class Search(Call):
    kind: ClassVar[InteractionKind] = InteractionKind.SEARCH
    request: SearchRequest | None = None


@dataclass
class History(Call):
    kind: ClassVar[InteractionKind] = InteractionKind.HISTORY
    count: int = 0
    offset: int = 0


@dataclass
class Create(Call):
    kind: ClassVar[InteractionKind] = InteractionKind.CREATE
    resource: dict[str, Any] = field(default_factory=dict)


@dataclass
class Update(Call):
    kind: ClassVar[InteractionKind] = InteractionKind.UPDATE
    resource: dict[str, Any] = field(default_factory=dict)
    if_match: str | None = None


@dataclass
class Delete(Call):
    kind: ClassVar[InteractionKind] = InteractionKind.DELETE
