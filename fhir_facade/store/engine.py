"""Database engines for the persistent store: one SQLite file (the default) or PostgreSQL.

SQLite gets foreign keys (off by default in SQLite) and WAL, so readers never block the single
writer; write transactions start with `BEGIN IMMEDIATE` so two writers queue on the database lock
instead of failing with SQLITE_BUSY when a read transaction tries to upgrade to a write
(sqlite.org/lang_transaction.html). PostgreSQL URLs are normalised to the psycopg 3 driver.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

__all__ = ["WRITE", "create_store_engine"]

#: Execution option that marks a connection as about to write (see `ResourceStore`): SQLite then
#: takes the write lock at BEGIN; other databases ignore it.
WRITE = "facade_write"

_SQLITE_BUSY_TIMEOUT_S = 30


def create_store_engine(url: str, *, echo: bool = False) -> Engine:
    """An Engine for `sqlite:///path` or `postgresql://user@host:port/db` (any postgres driver
    suffix is replaced by `+psycopg`, the maintained psycopg 3 driver). Raises ValueError for
    other databases: the store's SQL is tested on exactly these two."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        engine = create_engine(
            parsed,
            echo=echo,
            connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
        )
        _configure_sqlite(engine)
        return engine
    if backend == "postgresql":
        return create_engine(parsed.set(drivername="postgresql+psycopg"), echo=echo, pool_pre_ping=True)
    raise ValueError(f"Unsupported store database '{backend}': use sqlite:///path or postgresql://...")


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's own implicit BEGIN is
        # deferred and cannot be made IMMEDIATE per transaction).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get(WRITE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
