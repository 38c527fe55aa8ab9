"""Connections of the store: the ambient transaction of a FHIR transaction Bundle, write
connections, and snapshot read connections (docs/adr/0004-persistent-store.md)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from sqlalchemy import Connection, Engine

from fhir_facade.store.engine import WRITE

__all__ = [
    "AMBIENT_TRANSACTION",
    "begin_transaction",
    "end_transaction",
    "reading",
    "transaction",
    "write_connection",
]

#: The connection of an open multi-write transaction (a FHIR transaction Bundle). While set, every
#: read and write of the store runs on it, so the Bundle's entries see each other and commit or
#: roll back together. Context variables follow the request into worker threads (anyio copies
#: the context), which is how the async app's `atomic()` reaches the synchronous store.
AMBIENT_TRANSACTION: ContextVar[Connection | None] = ContextVar("facade_store_transaction", default=None)


def write_connection(engine: Engine) -> Connection:
    """A connection for writing: on SQLite its transaction begins IMMEDIATE (`engine.WRITE`)."""
    return engine.connect().execution_options(**{WRITE: True})


def begin_transaction(engine: Engine) -> Connection:
    """Open a write transaction for several interactions (see AMBIENT_TRANSACTION)."""
    connection = write_connection(engine)
    connection.begin()
    return connection


def end_transaction(connection: Connection, *, commit: bool) -> None:
    """Commit or roll back what `begin_transaction` opened, and close its connection."""
    try:
        if commit:
            connection.commit()
        else:
            connection.rollback()
    finally:
        connection.close()


@contextmanager
def transaction(engine: Engine) -> Iterator[None]:
    """All store interactions inside the block commit together or not at all."""
    connection = begin_transaction(engine)
    token = AMBIENT_TRANSACTION.set(connection)
    try:
        yield
    except BaseException:
        AMBIENT_TRANSACTION.reset(token)
        end_transaction(connection, commit=False)
        raise
    AMBIENT_TRANSACTION.reset(token)
    end_transaction(connection, commit=True)


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """The ambient transaction's connection (left open), else a fresh snapshot connection."""
    ambient = AMBIENT_TRANSACTION.get()
    if ambient is not None:
        yield ambient
        return
    with _read_connection(engine) as connection:
        yield connection


def _read_connection(engine: Engine) -> Connection:
    """A connection whose count and page see one snapshot: REPEATABLE READ on PostgreSQL
    (a SQLite read transaction is a snapshot already)."""
    connection = engine.connect()
    if connection.dialect.name == "postgresql":
        connection = connection.execution_options(isolation_level="REPEATABLE READ")
    return connection
