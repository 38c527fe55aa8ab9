"""The interactions as values: what a stage may look at before deciding to let one through.

Each call carries its arguments and knows the provider that will answer it, so a stage can ask for
the resource as it stands (`await call.current()`, read once and shared by every stage) without
calling the provider itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fhir_facade.fhir.errors import FhirError
from fhir_facade.fhir.pipeline.context import InteractionKind
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.search import SearchRequest

__all__ = ["Call", "Create", "Delete", "History", "Read", "Search", "Update", "Vread"]

_UNREAD = object()


@dataclass
class Call:
    """One interaction on `provider` (the provider being wrapped, never a pipelined one)."""

    provider: ResourceProvider
    kind: InteractionKind = field(init=False)
    _current: Any = field(default=_UNREAD, init=False, repr=False)

    @property
    def resource_id(self) -> str | None:
        return None

    async def current(self) -> dict[str, Any] | None:
        """The resource as stored now, None if it does not exist or is deleted (read once)."""
        if self._current is _UNREAD:
            resource_id = self.resource_id
            self._current = None
            if resource_id is not None:
                try:
                    self._current = await self.provider.read(resource_id)
                except FhirError as error:
                    if error.status not in (404, 410):
                        raise
        return self._current


@dataclass
class Read(Call):
    id: str = ""

    def __post_init__(self) -> None:
        self.kind = InteractionKind.READ

    @property
    def resource_id(self) -> str | None:
        return self.id


@dataclass
class Vread(Call):
    id: str = ""
    version_id: str = ""

    def __post_init__(self) -> None:
        self.kind = InteractionKind.VREAD

    @property
    def resource_id(self) -> str | None:
        return self.id


@dataclass
class Search(Call):
    request: SearchRequest | None = None

    def __post_init__(self) -> None:
        self.kind = InteractionKind.SEARCH


@dataclass
class History(Call):
    id: str | None = None
    count: int = 0
    offset: int = 0

    def __post_init__(self) -> None:
        self.kind = InteractionKind.HISTORY

    @property
    def resource_id(self) -> str | None:
        return self.id


@dataclass
class Create(Call):
    resource: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kind = InteractionKind.CREATE


@dataclass
class Update(Call):
    id: str = ""
    resource: dict[str, Any] = field(default_factory=dict)
    if_match: str | None = None

    def __post_init__(self) -> None:
        self.kind = InteractionKind.UPDATE

    @property
    def resource_id(self) -> str | None:
        return self.id


@dataclass
class Delete(Call):
    id: str = ""

    def __post_init__(self) -> None:
        self.kind = InteractionKind.DELETE

    @property
    def resource_id(self) -> str | None:
        return self.id
