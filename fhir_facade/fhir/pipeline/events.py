"""The typed events the pipeline publishes: what consumers (outbox, worklist, audit, subscriptions)
react to instead of hooking into the write path each its own way."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fhir_facade.fhir.pipeline.context import InteractionContext

__all__ = ["ChangeKind", "ResourceChanged", "VersionStored"]


class ChangeKind(enum.StrEnum):
    CREATED = "create"
    UPDATED = "update"
    DELETED = "delete"


@dataclass(frozen=True)
class ResourceChanged:
    """A stored resource was created, updated or deleted, and the change is committed.

    `before` is the version that was current before (None for a create), `after` the stored one
    (None for a delete). Published once per interaction, after the commit of the transaction it ran in.
    """

    change: ChangeKind
    resource_type: str
    resource_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    context: InteractionContext


@dataclass(frozen=True)
class VersionStored:
    """A version row is being written (not yet committed): the one pre-commit event, for work that
    must commit or roll back with the version itself (the transactional outbox, ADR 0007).

    `resource` is the stored content; for a deletion, the deleted stub (resourceType, id, meta).
    """

    resource_type: str
    resource_id: str
    version: int
    deleted: bool
    resource: dict[str, Any]
    at: datetime
