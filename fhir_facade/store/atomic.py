"""`atomic()`: a store transaction around several async interactions (a FHIR transaction Bundle).

The store is synchronous and runs in worker threads; the open connection travels to them in the
AMBIENT_TRANSACTION context variable, which anyio copies into every `run_in_threadpool` call.

Such a transaction holds its connection and its locks (SQLite: the database write lock of BEGIN
IMMEDIATE; PostgreSQL: row and conditional-write locks) across awaits, and needs a worker thread
for each store call. Transactions waiting for those locks wait in worker threads too, so enough of
them could take every thread (and every pooled connection) while the one holding the lock waits
for a thread: nothing moves until the 30 s timeouts fail them all. So each process opens at most
`open_transaction_limit` of them at once; the others wait for their turn here, in the event loop,
holding nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from sqlalchemy import Engine
from sqlalchemy.pool import QueuePool
from starlette.concurrency import run_in_threadpool

from fhir_facade.store.repository import ResourceStore
from fhir_facade.store.transactions import AMBIENT_TRANSACTION

__all__ = ["atomic_scope", "open_transaction_limit"]


def open_transaction_limit(engine: Engine) -> int:
    """How many multi-write transactions one process keeps open at once: one on SQLite (it has one
    writer at a time anyway), the pool's steady size on PostgreSQL (5 by default), which leaves
    the pool's overflow connections and most worker threads to every other request."""
    if engine.dialect.name == "sqlite":
        return 1
    pool = engine.pool
    return max(1, pool.size()) if isinstance(pool, QueuePool) else 1


def atomic_scope(store: ResourceStore) -> Callable[[], AbstractAsyncContextManager[None]]:
    """A factory of async contexts in which every store call commits together or not at all. The
    events of the interactions inside (store.bus) are published after the commit, or never."""
    turns = asyncio.Semaphore(open_transaction_limit(store.engine))

    @asynccontextmanager
    async def atomic() -> AsyncIterator[None]:
        async with turns:
            connection = await run_in_threadpool(store.begin_transaction)
            token = AMBIENT_TRANSACTION.set(connection)
            with store.bus.deferral() as events:
                try:
                    yield
                except BaseException:
                    AMBIENT_TRANSACTION.reset(token)
                    await run_in_threadpool(store.end_transaction, connection, commit=False)
                    raise
                AMBIENT_TRANSACTION.reset(token)
                await run_in_threadpool(store.end_transaction, connection, commit=True)
        await store.bus.flush(events)

    return atomic
