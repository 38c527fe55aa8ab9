"""Who wrote a version: the caller's principal, kept with the version it wrote.

Work that the server does later on a caller's behalf must run with that caller's rights, not the
server's: the analysis worklist runs a `requested` Task with the rights of whoever wrote that version
of the Task (docs/adr/0009-one-authorization-point.md). The authenticating dependency sets
``WRITE_AUTHOR`` for the request (the caller's `Access.principal()` JSON); the store records it on every
version written in that context, as it records the correlation id on the outbox row. None: the
server itself (background work) or an unauthenticated deployment (FACADE_AUTH=none).
"""

from __future__ import annotations

from contextvars import ContextVar

__all__ = ["WRITE_AUTHOR"]

WRITE_AUTHOR: ContextVar[str | None] = ContextVar("write_author", default=None)
