"""The event bus: how the rest of the server learns that something happened, once, after commit.

Three kinds of listener, after HAPI's STORAGE_PRECOMMIT_* and STORAGE_POSTCOMMIT pointcuts and
the transactional-outbox pattern (ADR 0007):

- pre-commit handlers (`on_precommit`) run synchronously inside the store's database write, with its
  connection, for rows that must commit or roll back with the version (outbox rows);
- in-transaction subscribers (`subscribe(..., in_transaction=True)`) run as soon as the interaction
  is done, inside its transaction when it has one and in its context (a transaction Bundle's entry):
  what they write commits or rolls back with it, and what they `warn()` reaches that entry's outcome;
- subscribers (`subscribe`) run after the commit, in the publisher's task and context (so a warning a
  subscriber raises still reaches the response being built). Inside `deferral()` (a transaction
  Bundle) events are held and published only when the whole transaction has committed, and dropped
  when it rolls back: nothing reacts to a change that never happened.

A failing subscriber is logged and does not fail the others or the write, which is committed already;
`publish(..., strict=True)` raises the first failure instead, for publishers that must retry (the
change-feed watcher keeps its position until every subscriber took a study).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

__all__ = ["EventBus", "PrecommitHandler", "Subscriber"]

log = logging.getLogger(__name__)

E = TypeVar("E")
Subscriber = Callable[[Any], Awaitable[None]]
#: (the open database connection, the event); storage-agnostic here, a SQLAlchemy Connection in use.
PrecommitHandler = Callable[[Any, Any], None]


class EventBus:
    """Typed publish/subscribe; handlers are looked up by the event's exact class."""

    def __init__(self) -> None:
        self._subscribers: dict[type, list[Subscriber]] = defaultdict(list)
        self._in_transaction: dict[type, list[Subscriber]] = defaultdict(list)
        self._precommit: dict[type, list[PrecommitHandler]] = defaultdict(list)
        self._held: ContextVar[list[Any] | None] = ContextVar(f"held_events_{id(self)}", default=None)

    def subscribe(
        self, event_type: type[E], handler: Callable[[E], Awaitable[None]], *, in_transaction: bool = False
    ) -> None:
        """Call `handler` for every event of `event_type`, in subscription order: after commit, or
        with `in_transaction` inside the publisher's transaction (a failure then fails the publisher)."""
        (self._in_transaction if in_transaction else self._subscribers)[event_type].append(handler)

    def on_precommit(self, event_type: type[E], handler: Callable[[Any, E], None]) -> None:
        """Call `handler(connection, event)` inside the transaction that produces `event_type`."""
        self._precommit[event_type].append(handler)

    def precommit(self, connection: Any, event: object) -> None:
        """Run the pre-commit handlers; an exception rolls the transaction back (the caller's)."""
        for handler in self._precommit.get(type(event), ()):
            handler(connection, event)

    def subscribers(self, event_type: type) -> tuple[Subscriber, ...]:
        return (*self._in_transaction.get(event_type, ()), *self._subscribers.get(event_type, ()))

    async def publish(self, event: object, *, strict: bool = False) -> None:
        """Hand `event` to its in-transaction subscribers now (their failure is the publisher's), and
        to the others now, or at commit when a deferral is open."""
        for handler in self._in_transaction.get(type(event), ()):
            await handler(event)
        await self._after_commit(event, strict=strict)

    async def _after_commit(self, event: object, *, strict: bool) -> None:
        held = self._held.get()
        if held is not None:
            held.append(event)
            return
        failure: BaseException | None = None
        for handler in self._subscribers.get(type(event), ()):
            try:
                await handler(event)
            except Exception as error:
                if strict and failure is None:
                    failure = error
                log.exception("A %s subscriber (%r) failed", type(event).__name__, handler)
        if failure is not None:
            raise failure

    @contextmanager
    def deferral(self) -> Iterator[list[Any]]:
        """Hold the events published inside the block; the caller flushes them after its commit
        (`flush`) or drops them on rollback. Nested deferrals share the outermost one's list."""
        if self._held.get() is not None:
            yield []  # the events go to the outermost deferral, which publishes them
            return
        held: list[Any] = []
        token = self._held.set(held)
        try:
            yield held
        finally:
            self._held.reset(token)

    async def flush(self, events: list[Any]) -> None:
        """Publish events held by a deferral, in order (call outside the deferral)."""
        for event in events:
            await self._after_commit(event, strict=False)
