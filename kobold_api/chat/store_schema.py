"""The conversation database's tables and the migrations that build them.

``conversations`` and ``messages`` hold the chats; ``turns`` (version 2) holds one row per chat
turn or edit while it runs, and afterwards for idempotent retries: who runs it (``owner``), until
when its lease holds (``lease_until``), the client's ``Idempotency-Key`` and what the turn answered.
See :mod:`kobold_api.chat.turns` for how replicas use it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .store_errors import SchemaVersionError

__all__ = ["METADATA", "schema_version_table", "conversations", "messages", "turns", "Migration", "MIGRATIONS",
           "read_schema_version", "migrate", "SCHEMA_LOCK_KEY"]

#: The PostgreSQL advisory lock key taken while the schema is read and migrated ("kobo").
SCHEMA_LOCK_KEY = 0x6B6F626F

# The tables as the *current* code reads and writes them. Migration steps must
# not use these objects: a step describes the schema as it was at its version,
# so it stays correct after these definitions change.
METADATA = sa.MetaData()

schema_version_table = sa.Table(
    "schema_version",
    METADATA,
    sa.Column("version", sa.Integer, nullable=False),
)

conversations = sa.Table(
    "conversations",
    METADATA,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("character", sa.String(255), nullable=False),
    sa.Column("user_name", sa.String(255), nullable=False),
    sa.Column("title", sa.String(500), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

messages = sa.Table(
    "messages",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "conversation_id",
        sa.String(32),
        sa.ForeignKey("conversations.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("speaker", sa.String(255), nullable=False),
    sa.Column("swipes", sa.JSON, nullable=False),
    sa.Column("swipe_id", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("extra", sa.JSON, nullable=False),
    sa.UniqueConstraint("conversation_id", "position", name="uq_messages_position"),
)


turns = sa.Table(
    "turns",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("conversation_id", sa.String(32), sa.ForeignKey("conversations.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("idempotency_key", sa.String(255), nullable=True),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("owner", sa.String(255), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("lease_until", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Column("outcome", sa.JSON, nullable=True),
    sa.Column("error", sa.String(500), nullable=True),
    sa.UniqueConstraint("conversation_id", "idempotency_key", name="uq_turns_idempotency_key"),
)


Migration = Callable[[Connection], None]
"""One schema step: receives a connection inside an open transaction."""


def _migration_1_create_tables(conn: Connection) -> None:
    """Version 1: conversations and their messages (frozen copy of the v1 schema)."""
    v1 = sa.MetaData()
    sa.Table(
        "conversations",
        v1,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("character", sa.String(255), nullable=False),
        sa.Column("user_name", sa.String(255), nullable=False),
        sa.Column("title", sa.String(500), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Index("ix_conversations_character", "character"),
        sa.Index("ix_conversations_updated_at", "updated_at"),
    )
    sa.Table(
        "messages",
        v1,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "conversation_id",
            sa.String(32),
            sa.ForeignKey("conversations.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("speaker", sa.String(255), nullable=False),
        sa.Column("swipes", sa.JSON, nullable=False),
        sa.Column("swipe_id", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("extra", sa.JSON, nullable=False),
        sa.UniqueConstraint("conversation_id", "position", name="uq_messages_position"),
    )
    v1.create_all(conn)


def _migration_2_turns(conn: Connection) -> None:
    """Version 2: leased chat turns, so replicas on one database take turns and retries are answered once."""
    v2 = sa.MetaData()
    sa.Table("conversations", v2, sa.Column("id", sa.String(32), primary_key=True))
    sa.Table(
        "turns",
        v2,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("conversation_id", sa.String(32), sa.ForeignKey("conversations.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("lease_until", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float, nullable=True),
        sa.Column("outcome", sa.JSON, nullable=True),
        sa.Column("error", sa.String(500), nullable=True),
        sa.UniqueConstraint("conversation_id", "idempotency_key", name="uq_turns_idempotency_key"),
        sa.Index("ix_turns_conversation_status", "conversation_id", "status"),
    )
    v2.tables["turns"].create(conn)


MIGRATIONS: tuple[Migration, ...] = (_migration_1_create_tables, _migration_2_turns)
"""Step ``i`` upgrades the schema from version ``i`` to ``i + 1``. Append only; never edit a shipped step."""


def read_schema_version(conn: Connection) -> int:
    """Current version; creates the bookkeeping table (version 0) on a fresh database."""
    schema_version_table.create(conn, checkfirst=True)
    version = conn.execute(sa.select(schema_version_table.c.version)).scalar()
    if version is None:
        conn.execute(schema_version_table.insert().values(version=0))
        return 0
    return int(version)


def migrate(write_engine: Engine, migrations: Sequence[Migration] = MIGRATIONS) -> None:
    """Bring the schema up to date, each pending step in its own transaction; a newer database is refused untouched.

    ``write_engine`` begins its transactions as writers (see :mod:`.store_engine`).
    """
    target = len(migrations)
    with write_engine.begin() as conn:
        _lock_schema(conn)
        current = read_schema_version(conn)
        if current > target:
            raise SchemaVersionError(
                f"conversation database schema is version {current}, but this "
                f"server only knows up to version {target}; upgrade kobold_api "
                "or point it at another data directory (the database was left untouched)"
            )
    for step_index in range(current, target):
        with write_engine.begin() as conn:
            _lock_schema(conn)
            # Re-read inside the transaction: another process may have
            # applied this step since we looked.
            if read_schema_version(conn) != step_index:
                continue
            migrations[step_index](conn)
            conn.execute(schema_version_table.update().values(version=step_index + 1))


def _lock_schema(conn: Connection) -> None:
    """Keep replicas that start together from migrating at once.

    On PostgreSQL a transaction advisory lock (two ``CREATE TABLE``s of one name collide there even
    with ``checkfirst``); SQLite's ``BEGIN IMMEDIATE`` already lets one writer in at a time.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
