"""`atomic()`: a store transaction around several async interactions (a FHIR transaction Bundle).

The store is synchronous and runs in worker threads; the open connection travels to them in the
AMBIENT_TRANSACTION context variable, which anyio copies into every `run_in_threadpool` call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from starlette.concurrency import run_in_threadpool

from fhir_facade.store.repository import AMBIENT_TRANSACTION, ResourceStore

__all__ = ["atomic_scope"]


def atomic_scope(store: ResourceStore) -> Callable[[], AbstractAsyncContextManager[None]]:
    """A factory of async contexts in which every store call commits together or not at all."""

    @asynccontextmanager
    async def atomic() -> AsyncIterator[None]:
        connection = await run_in_threadpool(store.begin_transaction)
        token = AMBIENT_TRANSACTION.set(connection)
        try:
            yield
        except BaseException:
            AMBIENT_TRANSACTION.reset(token)
            await run_in_threadpool(store.end_transaction, connection, commit=False)
            raise
        AMBIENT_TRANSACTION.reset(token)
        await run_in_threadpool(store.end_transaction, connection, commit=True)

    return atomic
