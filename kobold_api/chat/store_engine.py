"""Opening the conversation database: a SQLAlchemy engine for any URL, SQLite made safe for a server.

SQLite is the default deployment, so it gets extra care: WAL journal (readers never block the
writer), foreign keys, a busy timeout, and explicit ``BEGIN`` / ``BEGIN IMMEDIATE`` so that DDL and
reads really run inside transactions (Python's ``sqlite3`` legacy mode would otherwise autocommit
them). A connection whose execution options carry ``kobold_write=True`` begins with
``BEGIN IMMEDIATE``: writers take SQLite's write lock up front.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.pool import StaticPool

__all__ = ["open_engine", "SQLITE_BUSY_TIMEOUT_MS"]

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
            cursor.execute("PRAGMA journal_mode = WAL")
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
