"""Opening the conversation database: a SQLAlchemy engine for any URL, SQLite made safe for a server.

SQLite is the default deployment, so it gets extra care: WAL journal (readers never block the
writer), foreign keys, a busy timeout, and explicit ``BEGIN`` / ``BEGIN IMMEDIATE`` so that DDL and
reads really run inside transactions (Python's ``sqlite3`` legacy mode would otherwise autocommit
them). A connection whose execution options carry ``kobold_write=True`` begins with
``BEGIN IMMEDIATE``: writers take SQLite's write lock up front.

A server database (PostgreSQL) can restart, fail over or drop a connection while the server runs.
Its pool checks each connection before handing it out (``pool_pre_ping``), so connections that a
restart closed are replaced, not used: a database that is back costs no request. :func:`transaction`
turns a database that does not answer into :class:`DatabaseUnavailable`, and
:func:`once_more_if_disconnected` runs an operation again, once, when its connection was lost
before its ``COMMIT`` was sent (the server rolled the transaction back, so nothing is applied twice).
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.pool import StaticPool

from .store_errors import DatabaseUnavailable

__all__ = ["open_engine", "transaction", "once_more_if_disconnected", "ConnectionLost", "SQLITE_BUSY_TIMEOUT_MS"]

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
"""How long a SQLite writer waits for another writer before failing with 'database is locked'."""


def open_engine(url: str) -> Engine:
    """Build the engine; SQLite gets its parent folder created and its hooks installed."""
    parsed = make_url(url)
    # Non-ASCII (most chats) is stored as-is instead of \\u escapes.
    kwargs: dict[str, Any] = {
        "json_serializer": lambda obj: json.dumps(obj, ensure_ascii=False),
    }
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite:
        database = parsed.database or ""
        in_memory = database in ("", ":memory:") or parsed.query.get("mode") == "memory"
        kwargs["connect_args"] = {"check_same_thread": False}
        if in_memory:
            # One shared connection, or every pooled connection would see its own
            # empty database. Transactions from concurrent threads would collide on
            # it, so in-memory stores are for tests and single-threaded tools only.
            kwargs["poolclass"] = StaticPool
        elif not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    else:
        # A round trip per checkout, so that a connection the server closed (a restart, a
        # failover, an idle timeout) is replaced before use instead of failing a request; a
        # failed ping also discards every older pooled connection.
        kwargs["pool_pre_ping"] = True
    engine = sa.create_engine(parsed, **kwargs)
    if is_sqlite:
        _install_sqlite_hooks(engine)
    return engine


def _install_sqlite_hooks(engine: Engine) -> None:
    """WAL, foreign keys, busy timeout, and real transactions for the sqlite3 driver."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        if hasattr(dbapi_connection, "isolation_level"):
            # Stop sqlite3 from managing BEGIN itself: it skips BEGIN for
            # DDL and SELECT, which would make migrations non-atomic.
            dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys = ON")
            # Persistent in the file; a no-op ('memory') for in-memory databases.
            _switch_to_wal(cursor)
            cursor.execute("PRAGMA synchronous = NORMAL")  # safe with WAL, far fewer fsyncs
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock up front: a deferred transaction that
        # later upgrades can fail with SQLITE_BUSY without waiting for the
        # busy timeout when another writer got there first.
        immediate = conn.get_execution_options().get("kobold_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _switch_to_wal(cursor: Any) -> None:
    """``PRAGMA journal_mode = WAL``, retried while another connection switches too.

    On a new file the switch needs the exclusive lock while this connection already reads: two
    connections doing it at once (replicas starting together) deadlock, and SQLite answers one
    of them "database is locked" at once instead of waiting out the busy timeout. Once the other
    one has switched the file, the switch is a no-op.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class ConnectionLost(DatabaseUnavailable):
    """The connection was lost before the transaction's ``COMMIT`` was sent: the database rolled
    it back, so running the whole operation again is safe (:func:`once_more_if_disconnected`)."""


def _unavailable(kind: type[DatabaseUnavailable], error: sa.exc.DBAPIError, when: str) -> DatabaseUnavailable:
    """The store's error for a driver's ``error``; the driver's text stays in the log (it can
    name hosts and users), the client is told only that the database does not answer."""
    reason = type(error.orig).__name__ if error.orig is not None else type(error).__name__
    log.warning("the conversation database does not answer (%s %s): %s", reason, when,
                str(error.orig or error).partition("\n")[0])
    stored = "it is not known whether the change was stored" if when == "committing" else "nothing was stored"
    return kind(f"The conversation database does not answer ({reason}); {stored}. Try again in a moment.")


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction on ``engine``: commits when the block ends, rolls back on any exception.

    A database that cannot be reached raises :class:`DatabaseUnavailable`; a connection lost in
    the block (before ``COMMIT``) raises :class:`ConnectionLost`; one lost while committing raises
    plain :class:`DatabaseUnavailable`, as the commit may or may not have been applied.
    """
    try:
        conn = engine.connect()
    except sa.exc.DBAPIError as exc:  # refused, shutting down, starting up, the pool's new connection failed
        raise _unavailable(DatabaseUnavailable, exc, "connecting") from exc
    with conn:
        committing = False
        try:
            with conn.begin():
                yield conn
                committing = True  # the block is done: leaving conn.begin() sends COMMIT
        except sa.exc.DBAPIError as exc:
            if not exc.connection_invalidated:  # a statement's own error (a constraint, a lock timeout)
                raise
            if committing:
                raise _unavailable(DatabaseUnavailable, exc, "committing") from exc
            raise _unavailable(ConnectionLost, exc, "in a transaction") from exc


_Operation = TypeVar("_Operation", bound=Callable[..., Any])


def once_more_if_disconnected(operation: _Operation) -> _Operation:
    """Run ``operation`` (one store transaction) again, once, when it raised :class:`ConnectionLost`.

    Safe because that transaction never committed; the pool already replaced the dead connection.
    Only for operations that are one transaction and have no effect outside it before it commits.
    """

    @functools.wraps(operation)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return operation(*args, **kwargs)
        except ConnectionLost:
            log.warning("running %s again on a new database connection", operation.__name__)
            return operation(*args, **kwargs)

    return run  # type: ignore[return-value]
