"""Conditional create and conditional update as one atomic step (FHIR R4 http.html#ccreate,
http.html#cond-update: "the server ... creates at most one resource" for given criteria).

A conditional write is a search followed by a write. Both must see the same matches, or N
identical requests arriving together all find nothing and all create (docs/adr/0012). The search
runs as usual (through the authorization wrapper, as the caller); the write then re-checks it:

1. `write_interactions` opens a `ConditionalGuard` for the criteria and runs the search inside
   `guard.searching()`. The stored provider records what the *store* answered (the request as it
   reached the store, with any compartment clauses, and the matching ids and total).
2. The write runs inside `guard.writing()`. The stored provider hands the guard to the store, which,
   in the write's own database transaction and before writing anything, takes the lock on the
   criteria (PostgreSQL: `pg_advisory_xact_lock`; SQLite: the database write lock of BEGIN
   IMMEDIATE) and runs the recorded search again. Different matches raise `ConditionChanged`.
3. `guarded()` then starts over with a fresh search: a conditional create now finds the resource
   the winner created (200), a conditional update updates it.

The lock is held only inside the one synchronous store call that writes (never across awaits), so
waiting writers never hold up the one that has the lock, and it is the database's lock, so it holds
across facade processes (replicas) on one database. Context variables carry the guard because the
authorization wrapper sits between this module and the stored provider.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import TypeVar
from urllib.parse import urlencode

from fhir_facade.fhir.errors import FhirError, Issue, conflict
from fhir_facade.fhir.search import SearchRequest

__all__ = [
    "CONDITIONAL_LOCK_SPACE",
    "ConditionChanged",
    "ConditionalGuard",
    "active_guard",
    "canonical_criteria",
    "guarded",
]

T = TypeVar("T")

#: First key of the two-key PostgreSQL advisory lock on conditional writes ("cond" in ASCII); the
#: second is a hash of the criteria. Two-key locks never collide with one-key ones (migrations).
CONDITIONAL_LOCK_SPACE = 0x636F6E64

#: A conditional write whose matches keep changing under it is tried this often, then 409.
_ATTEMPTS = 5

_GUARD: ContextVar[ConditionalGuard | None] = ContextVar("facade_conditional_guard", default=None)


class ConditionChanged(FhirError):
    """The matches of a conditional write changed between its search and its write (409 if it
    ever reaches a client: `guarded()` catches it and starts over)."""


@dataclass
class ConditionalGuard:
    """One attempt at a conditional write of `resource_type` with canonical `criteria`."""

    resource_type: str
    criteria: str
    #: The search as it reached the store, and the ids and total the store found for it.
    request: SearchRequest | None = None
    seen: tuple[tuple[str, ...], int] | None = None
    #: "searching", "writing", or "" outside both.
    phase: str = ""

    @property
    def lock_key(self) -> int:
        """The criteria's second advisory-lock key: a signed 32-bit hash of type and criteria (a
        collision only makes two unrelated conditional writes wait for each other)."""
        digest = hashlib.blake2b(f"{self.resource_type}?{self.criteria}".encode(), digest_size=4).digest()
        return int.from_bytes(digest, "big", signed=True)

    @contextmanager
    def searching(self) -> Iterator[None]:
        """The conditional search runs in here: the stored provider records what it found."""
        with self._active("searching"):
            yield

    @contextmanager
    def writing(self) -> Iterator[None]:
        """The conditional write runs in here: the stored provider passes the guard to the store."""
        with self._active("writing"):
            yield

    @contextmanager
    def _active(self, phase: str) -> Iterator[None]:
        self.phase = phase
        token = _GUARD.set(self)
        try:
            yield
        finally:
            _GUARD.reset(token)
            self.phase = ""

    def record(self, request: SearchRequest, ids: Sequence[str], total: int) -> None:
        """Keep the first store search of the type (later ones, e.g. the authorization wrapper's
        `_id` checks, are not the condition)."""
        if self.request is None:
            self.request = replace(request, clauses=list(request.clauses), snapshot=None)
            self.seen = (tuple(ids), total)

    def changed(self, ids: Sequence[str], total: int) -> ConditionChanged | None:
        """The error to raise when the store now finds other matches than the search did."""
        if self.seen == (tuple(ids), total):
            return None
        return ConditionChanged(
            409,
            [
                Issue(
                    "conflict",
                    f"The resources matching {self.resource_type}?{self.criteria} changed "
                    "while the conditional write ran",
                )
            ],
        )


def active_guard(resource_type: str, phase: str) -> ConditionalGuard | None:
    """The guard of the conditional write in progress for `resource_type` in `phase`
    ("searching" or "writing"), if any."""
    guard = _GUARD.get()
    if guard is None or guard.resource_type != resource_type or guard.phase != phase:
        return None
    return guard


def canonical_criteria(params: Sequence[tuple[str, str]]) -> str:
    """The criteria in one spelling (sorted pairs), so the same criteria take the same lock."""
    return urlencode(sorted(params))


async def guarded(
    resource_type: str,
    params: Sequence[tuple[str, str]],
    attempt: Callable[[ConditionalGuard], Awaitable[T]],
) -> T:
    """Run `attempt` (search in `guard.searching()`, write in `guard.writing()`) until its write
    found the matches its search found; 409 after `_ATTEMPTS` tries."""
    criteria = canonical_criteria(params)
    for _ in range(_ATTEMPTS):
        try:
            return await attempt(ConditionalGuard(resource_type, criteria))
        except ConditionChanged:
            continue
    raise conflict(
        f"The resources matching {resource_type}?{criteria} kept changing; the conditional "
        f"write was tried {_ATTEMPTS} times. Retry it."
    )
