"""Warnings raised by a write that succeeded, carried from the provider to the response.

FHIR reports hints and warnings about a successful write in an OperationOutcome: the body of the
answer when the client asks for it with `Prefer: return=OperationOutcome` (R4 http.html#ops), and
`Bundle.entry.response.outcome` inside a batch or transaction response (R4 bundle.html, "hints and
warnings produced as part of processing this entry"). A provider calls `warn()`; the write interaction
that called it (`write_interactions`) collects the issues with `collecting()`. A `warn()` outside any
collection (a write by the server itself) is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from fhir_facade.fhir.errors import Issue

__all__ = ["collecting", "warn"]

_collected: ContextVar[list[Issue] | None] = ContextVar("write_warnings", default=None)


def warn(issue: Issue) -> None:
    """Record a warning about the write in progress."""
    collected = _collected.get()
    if collected is not None:
        collected.append(issue)


@contextmanager
def collecting() -> Iterator[list[Issue]]:
    """Collect the warnings of the writes inside the block (nested blocks keep their own)."""
    issues: list[Issue] = []
    token = _collected.set(issues)
    try:
        yield issues
    finally:
        _collected.reset(token)
