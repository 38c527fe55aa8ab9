"""Resources only their author may see: a Subscription names its receiver and may carry the
receiver's secrets (`channel.header`); it belongs to the client (and user) that created it, whatever
patient it filters on. Types are marked `"visibleTo": "author"` in capability/resource-types.json.

Applied by the authorization stage after the scope and compartment checks (auth/enforcement.py):
a caller granted by a `system/` scope (backend services act for the organisation) or the server
itself (FACADE_AUTH=none) sees every one; any other caller sees only those whose first version it
wrote (`resource_version.author`, ADR 0009), and every other one answers like one that is not there
(404), in reads, searches, history and writes alike.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fhir_facade.auth.access import Access, authenticated_caller
from fhir_facade.auth.scopes import Interaction
from fhir_facade.fhir.bundles import SearchResult
from fhir_facade.fhir.errors import FhirError, not_found

__all__ = ["AuthorOnly"]

log = logging.getLogger(__name__)

#: (resource id, version id) -> the principal that wrote that version (None: the server).
AuthorLookup = Callable[[str, str], Awaitable[str | None]]


class AuthorOnly:
    """The author check for one type."""

    def __init__(self, resource_type: str, author_of: AuthorLookup) -> None:
        self.resource_type = resource_type
        self._author_of = author_of

    def _restricted(self, interaction: Interaction) -> Access | None:
        """The caller, when it may see only its own resources; None when it sees every one."""
        access = authenticated_caller()
        if not access.enforced:
            return None
        granting = access.scopes.granting(interaction, self.resource_type)
        if any(scope.context == "system" for scope in granting):
            return None
        return access

    async def _own(self, resource_id: str, caller: Access) -> bool:
        principal = await self._author_of(resource_id, "1")  # the creator, not a later server update
        return principal is not None and Access.from_principal(principal).same_principal(caller)

    def _unknown(self, resource_id: str) -> FhirError:
        return not_found(f"{self.resource_type}/{resource_id} is not known")

    async def check(self, interaction: Interaction, resource_id: str) -> None:
        """404 unless the caller may see `resource_id` (for read, vread, instance history, writes)."""
        caller = self._restricted(interaction)
        if caller is not None and not await self._own(resource_id, caller):
            log.info("Refused %s/%s to %s: not its author", self.resource_type, resource_id, caller.who)
            raise self._unknown(resource_id)

    async def filter_search(self, result: SearchResult) -> SearchResult:
        caller = self._restricted(Interaction.SEARCH)
        if caller is None:
            return result
        kept = [m for m in result.matches if await self._own(m["id"], caller)]
        if len(kept) != len(result.matches) or result.total is not None:
            result.total = None  # the inner total counts other clients' resources
        result.matches = kept
        return result

    async def filter_history(
        self, entries: list[dict[str, Any]], total: int
    ) -> tuple[list[dict[str, Any]], int]:
        """A type history page with only the caller's resources (the total then counts the page)."""
        caller = self._restricted(Interaction.SEARCH)
        if caller is None:
            return entries, total
        kept = [e for e in entries if await self._own(e["id"], caller)]
        return kept, len(kept)
