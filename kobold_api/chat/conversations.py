"""Persistent chat conversations, so a client only has to send its new message.

The server (not the client) owns the chat history: a conversation with a
character is a row in ``conversations`` plus an ordered list of ``messages``.
Every message keeps all of its alternative texts (``swipes``) and which one is
shown (``swipe_id``), matching what SillyTavern-style clients expect for
swipes, regenerate and continue (see ``shared/reference/chat_and_cards.md`` §4).

Design points
-------------
* **Any SQLAlchemy URL** works (SQLAlchemy Core, no ORM session state). SQLite is
  the default deployment and gets extra care (:mod:`.store_engine`).
* **Every public operation is one transaction.** A failure half-way (e.g. after
  the user message of a turn was inserted) rolls everything back. A database that does not
  answer raises :class:`DatabaseUnavailable`; an operation whose connection was lost before it
  committed runs again once (:func:`.store_engine.once_more_if_disconnected`).
* **Versioned migrations** (:mod:`.store_schema`). ``schema_version`` holds one integer; the steps
  in :data:`MIGRATIONS` are applied in order at start-up, one transaction each.
  Adding a schema change later means appending one function to that tuple.
  A database written by a newer server is refused, never modified.
* **Turn serialization.** Storage calls are atomic, but a chat turn is
  "read history -> generate (slow) -> store reply". :meth:`ConversationStore.lock`
  hands out a per-conversation lock that the chat service holds for that whole
  span, so two turns of one process never interleave; :meth:`ConversationStore.claim_turn`
  leases the conversation in the database for that span, so neither do turns of
  several processes (replicas) on one database (see :mod:`.turns`).
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..settings import DATABASE_FILE
from . import turns
from .conversation import ROLES, Conversation, Message, conversation_from_row, message_from_row
from .store_engine import once_more_if_disconnected, open_engine, transaction
from .store_errors import (
    ConversationNotFound, DatabaseUnavailable, IdempotencyKeyReused, MessageNotFound, SchemaVersionError, StoreError,
    SwipeNotFound, TurnLost,
)
from .store_schema import (
    MIGRATIONS, Migration, conversations as _conversations, messages as _messages, migrate,
    schema_version_table as _schema_version, turns as _turns,
)
from .turns import LeaseKeeper, TurnBusy, TurnTicket

__all__ = [
    "ConversationStore",
    "Conversation",
    "Message",
    "StoreError",
    "ConversationNotFound",
    "MessageNotFound",
    "SwipeNotFound",
    "SchemaVersionError",
    "DatabaseUnavailable",
    "TurnLost",
    "IdempotencyKeyReused",
    "TurnBusy",
    "TurnTicket",
    "Migration",
    "MIGRATIONS",
    "ROLES",
]

_ID_BYTES = 8  # token_urlsafe(8) -> 11 characters, 64 random bits


# --------------------------------------------------------------------------- store


class ConversationStore:
    """All conversation persistence for one server; built once by the app factory.

    Thread-safe: SQLAlchemy's pool gives each thread its own connection and every
    method is a single transaction. See :meth:`lock` for serializing whole turns.
    """

    def __init__(
        self,
        url: str,
        *,
        migrations: Sequence[Migration] = MIGRATIONS,
        clock: Callable[[], float] = time.time,
        owner: str = "",
        lease_seconds: float = 30.0,
    ) -> None:
        """Open (creating if needed) the database at ``url`` and bring its schema up to date.

        ``owner`` names this process in the turns it runs (a replica's name; made unique per
        store), ``lease_seconds`` how long such a turn's lease lasts unrenewed.
        ``migrations`` and ``clock`` exist so tests can add a schema step or
        freeze time; production code passes neither.
        """
        self._clock = clock
        self.owner = f"{owner or 'kobold_api'}/{os.getpid()}/{secrets.token_hex(3)}"
        self.lease_seconds = lease_seconds
        self._leases = LeaseKeeper(lease_seconds, self._renew_leases)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._engine = open_engine(url)
        # Same pool and events; its connections start write transactions with
        # BEGIN IMMEDIATE on SQLite (see _install_sqlite_hooks).
        self._write_engine = self._engine.execution_options(kobold_write=True)
        try:
            migrate(self._write_engine, migrations)
        except BaseException:
            self._engine.dispose()
            raise

    @classmethod
    def for_data_dir(cls, path: str | Path, **kwargs: Any) -> ConversationStore:
        """The server's default: ``<data dir>/conversations.db`` (SQLite)."""
        db_path = Path(path).expanduser().resolve() / DATABASE_FILE
        return cls(f"sqlite:///{db_path}", **kwargs)

    def close(self) -> None:
        """Stop renewing leases and release all pooled connections (lets SQLite checkpoint and drop
        its WAL file)."""
        self._leases.stop()
        self._engine.dispose()

    def __enter__(self) -> ConversationStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def engine(self) -> Engine:
        """The underlying engine, for diagnostics and tests (e.g. checking PRAGMAs)."""
        return self._engine

    # ------------------------------------------------------------ schema

    def ping(self) -> None:
        """Raise if the database does not answer (what /health checks)."""
        with self._engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def schema_version(self) -> int:
        """The version recorded in the database (== number of applied steps)."""
        with self._engine.connect() as conn:
            return int(conn.execute(sa.select(_schema_version.c.version)).scalar_one())

    # ------------------------------------------------------------ serialization

    def lock(self, conversation_id: str) -> threading.Lock:
        """The lock that serializes whole chat turns on one conversation.

        Usage (chat service)::

            with store.lock(cid):
                history = store.get(cid)
                reply = generate(history, user_text)   # slow
                store.add_turn(cid, user_text, reply, speaker)

        Each storage call is already atomic; the lock prevents a second turn from
        reading the history while the first is still generating, which would
        otherwise store two replies to the same context in an arbitrary order.
        Not re-entrant, and only serializes threads of this process (:meth:`claim_turn`
        serializes processes); the store's own methods never take it. Different
        conversations do not block each other.
        """
        with self._locks_guard:
            existing = self._locks.get(conversation_id)
            if existing is None:
                existing = self._locks[conversation_id] = threading.Lock()
            return existing

    def _forget_lock(self, conversation_id: str) -> None:
        """Drop a deleted conversation's lock so the dict does not grow forever."""
        with self._locks_guard:
            existing = self._locks.get(conversation_id)
            if existing is not None and not existing.locked():
                del self._locks[conversation_id]

    # ------------------------------------------------------------ leased turns

    @once_more_if_disconnected
    def claim_turn(self, conversation_id: str, *, kind: str = "turn", key: str | None = None,
                   fingerprint: str = "") -> TurnTicket:
        """Lease the conversation for one turn (or edit) in the database; see :mod:`.turns`.

        Raises :class:`TurnBusy` while another turn runs (the caller waits and asks again),
        :class:`ConversationNotFound`, and :class:`IdempotencyKeyReused`. A ticket with
        ``replay`` set is a finished turn of the same key: nothing is leased.
        """
        with self._writing() as conn:
            ticket = turns.claim(conn, conversation_id, self.owner, self._clock, self.lease_seconds,
                                 kind=kind, key=key, fingerprint=fingerprint)
        if ticket.replay is None:
            self._leases.hold(ticket.id)
        return ticket

    @once_more_if_disconnected
    def release_turn(self, ticket: TurnTicket, error: str = "ended without a reply") -> None:
        """End a claimed turn that stored nothing (aborted, failed); harmless after it completed."""
        if ticket.replay is not None:
            return
        self._leases.drop(ticket.id)
        with self._writing() as conn:
            turns.release(conn, ticket, self._clock(), error)

    @once_more_if_disconnected
    def finish_turn(self, ticket: TurnTicket, outcome: Mapping[str, Any]) -> None:
        """Complete a claimed turn that stores no message (an impersonated line, an edit)."""
        with self._writing(ticket, outcome):
            pass

    @once_more_if_disconnected
    def _renew_leases(self, ids: list[int]) -> None:
        with self._writing() as conn:
            turns.renew(conn, ids, self.owner, self._clock() + self.lease_seconds)

    # ------------------------------------------------------------ transactions

    @contextmanager
    def _writing(self, turn: TurnTicket | None = None,
                 outcome: Mapping[str, Any] | None = None) -> Iterator[Connection]:
        """One write transaction: commits on success, rolls everything back on any exception.

        With ``turn``, the same transaction completes that claimed turn with ``outcome`` (and
        rolls the writes back with :class:`TurnLost` when the turn's lease was lost).
        """
        try:
            with transaction(self._write_engine) as conn:
                yield conn
                if turn is not None:
                    turns.complete(conn, turn, self._clock(), outcome or {})
        finally:
            if turn is not None:
                self._leases.drop(turn.id)

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        """One read transaction, so a conversation and its messages come from one snapshot."""
        with transaction(self._engine) as conn:
            yield conn

    # ------------------------------------------------------------ conversation operations

    @once_more_if_disconnected
    def create(
        self,
        character: str,
        user_name: str,
        greetings: Sequence[str],
        title: str | None = None,
    ) -> Conversation:
        """Start a conversation; the greetings become the swipes of message 0.

        Empty greetings are skipped (a card without ``first_mes`` has none);
        with no greeting left the conversation starts empty.
        """
        now = self._clock()
        swipes = [g for g in greetings if g]
        with self._writing() as conn:
            conversation_id = self._new_conversation_id(conn)
            conn.execute(
                _conversations.insert().values(
                    id=conversation_id,
                    character=character,
                    user_name=user_name,
                    title=title if title is not None else f"Chat with {character}",
                    created_at=now,
                    updated_at=now,
                )
            )
            if swipes:
                self._insert_message(
                    conn, conversation_id, 0, "character", character, swipes, 0, now, {}
                )
            return self._load(conn, conversation_id, with_messages=True)

    @once_more_if_disconnected
    def require(self, conversation_id: str) -> None:
        """Raise :class:`ConversationNotFound` unless the conversation exists (without loading it)."""
        with self._reading() as conn:
            self._require_conversation(conn, conversation_id)

    @once_more_if_disconnected
    def get(self, conversation_id: str) -> Conversation:
        """The conversation with all of its messages."""
        with self._reading() as conn:
            return self._load(conn, conversation_id, with_messages=True)

    @once_more_if_disconnected
    def rename(self, conversation_id: str, title: str) -> Conversation:
        """Change the title; returns the conversation without its messages."""
        with self._writing() as conn:
            self._require_conversation(conn, conversation_id)
            conn.execute(
                _conversations.update()
                .where(_conversations.c.id == conversation_id)
                .values(title=title, updated_at=self._clock())
            )
            return self._load(conn, conversation_id, with_messages=False)

    @once_more_if_disconnected
    def delete(self, conversation_id: str) -> None:
        """Remove the conversation and its messages."""
        with self._writing() as conn:
            self._require_conversation(conn, conversation_id)
            # Explicit rather than relying on ON DELETE CASCADE, which needs
            # foreign keys switched on (not every backend/driver does by default).
            conn.execute(_messages.delete().where(_messages.c.conversation_id == conversation_id))
            conn.execute(_turns.delete().where(_turns.c.conversation_id == conversation_id))
            conn.execute(_conversations.delete().where(_conversations.c.id == conversation_id))
        self._forget_lock(conversation_id)

    def export(self, conversation_id: str) -> dict[str, Any]:
        """A self-contained JSON document of the conversation, every swipe included."""
        conversation = self.get(conversation_id)
        return {
            "format": "kobold_api.conversation",
            "format_version": 1,
            **conversation.to_dict(include_messages=True),
        }

    # ------------------------------------------------------------ message operations

    @once_more_if_disconnected
    def add_turn(
        self,
        conversation_id: str,
        user_text: str | None,
        reply: str,
        speaker: str | None = None,
        *,
        extra: Mapping[str, Any] | None = None,
        turn: TurnTicket | None = None,
        outcome: Mapping[str, Any] | None = None,
    ) -> list[Message]:
        """Append the user's message (unless ``None``) and the reply, atomically.

        ``speaker`` defaults to the conversation's character; ``extra`` is stored
        on the reply (e.g. generation settings). With ``turn`` (a claimed turn) the
        same transaction completes it with ``outcome``. Returns the new messages.
        """
        now = self._clock()
        with self._writing(turn, outcome) as conn:
            conversation = self._require_conversation(conn, conversation_id)
            position = self._count_messages(conn, conversation_id)
            added: list[Message] = []
            if user_text is not None:
                added.append(
                    self._insert_message(
                        conn, conversation_id, position, "user",
                        conversation.user_name, [user_text], 0, now, {},
                    )
                )
                position += 1
            added.append(
                self._insert_message(
                    conn, conversation_id, position, "character",
                    speaker or conversation.character, [reply], 0, now, dict(extra or {}),
                )
            )
            self._touch(conn, conversation_id, now)
            return added

    @once_more_if_disconnected
    def add_message(
        self,
        conversation_id: str,
        role: str,
        text: str,
        speaker: str | None = None,
        *,
        extra: Mapping[str, Any] | None = None,
    ) -> Message:
        """Append a single message (e.g. a ``system`` note or a user message sent without generating).

        ``speaker`` defaults to the user name for ``user`` messages and the
        character otherwise.
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {sorted(ROLES)}, got {role!r}")
        now = self._clock()
        with self._writing() as conn:
            conversation = self._require_conversation(conn, conversation_id)
            default_speaker = conversation.user_name if role == "user" else conversation.character
            message = self._insert_message(
                conn, conversation_id, self._count_messages(conn, conversation_id), role,
                speaker or default_speaker, [text], 0, now, dict(extra or {}),
            )
            self._touch(conn, conversation_id, now)
            return message

    def edit_message(self, conversation_id: str, index: int, text: str) -> Message:
        """Replace the text of the shown swipe (other swipes are kept)."""
        return self._update_message(
            conversation_id, index, lambda m: _replace_shown(m, text)
        )

    def append_to_message(self, conversation_id: str, index: int, text: str, *, turn: TurnTicket | None = None,
                          outcome: Mapping[str, Any] | None = None) -> Message:
        """Continue: add generated text to the end of the shown swipe (``turn``: as for add_turn)."""
        return self._update_message(
            conversation_id, index, lambda m: _replace_shown(m, m.text + text), turn, outcome
        )

    def add_swipe(self, conversation_id: str, index: int, text: str, *, turn: TurnTicket | None = None,
                  outcome: Mapping[str, Any] | None = None) -> Message:
        """Regenerate / swipe right: keep the old texts, append ``text`` and show it (``turn``: as for add_turn)."""

        def append(message: Message) -> tuple[list[str], int]:
            swipes = [*message.swipes, text]
            return swipes, len(swipes) - 1

        return self._update_message(conversation_id, index, append, turn, outcome)

    def set_swipe(self, conversation_id: str, index: int, swipe_id: int) -> Message:
        """Show another existing alternative of a message."""

        def select(message: Message) -> tuple[list[str], int]:
            if not 0 <= swipe_id < len(message.swipes):
                raise SwipeNotFound(
                    f"message {message.index} of conversation {conversation_id!r} has "
                    f"{len(message.swipes)} swipe(s); swipe_id {swipe_id} is out of range"
                )
            return message.swipes, swipe_id

        return self._update_message(conversation_id, index, select)

    @once_more_if_disconnected
    def delete_message(self, conversation_id: str, index: int) -> None:
        """Remove one message; later messages move up so indexes stay 0..n-1."""
        with self._writing() as conn:
            self._require_conversation(conn, conversation_id)
            position = self._resolve_index(conn, conversation_id, index)
            in_conversation = _messages.c.conversation_id == conversation_id
            conn.execute(_messages.delete().where(in_conversation, _messages.c.position == position))
            # Two steps so no intermediate row collides with the unique
            # (conversation_id, position) constraint whatever order rows update in.
            conn.execute(
                _messages.update()
                .where(in_conversation, _messages.c.position > position)
                .values(position=-_messages.c.position)
            )
            conn.execute(
                _messages.update()
                .where(in_conversation, _messages.c.position < 0)
                .values(position=-_messages.c.position - 1)
            )
            self._touch(conn, conversation_id, self._clock())

    # ------------------------------------------------------------ listing

    @once_more_if_disconnected
    def list(self, character: str | None = None) -> list[Conversation]:
        """Conversations (without messages), most recently active first; optionally one character's."""
        counts = (
            sa.select(_messages.c.conversation_id, sa.func.count().label("n"))
            .group_by(_messages.c.conversation_id)
            .subquery()
        )
        query = (
            sa.select(_conversations, sa.func.coalesce(counts.c.n, 0).label("message_count"))
            .select_from(_conversations.outerjoin(counts, counts.c.conversation_id == _conversations.c.id))
            .order_by(
                _conversations.c.updated_at.desc(),
                _conversations.c.created_at.desc(),
                _conversations.c.id,
            )
        )
        if character is not None:
            query = query.where(_conversations.c.character == character)
        with self._reading() as conn:
            return [conversation_from_row(row) for row in conn.execute(query).mappings()]

    # ------------------------------------------------------------ helpers

    def _new_conversation_id(self, conn: Connection) -> str:
        """A short, URL-safe, unguessable id not used yet."""
        while True:
            candidate = secrets.token_urlsafe(_ID_BYTES)
            taken = conn.execute(
                sa.select(_conversations.c.id).where(_conversations.c.id == candidate)
            ).first()
            if taken is None:
                return candidate

    def _require_conversation(self, conn: Connection, conversation_id: str) -> Conversation:
        row = conn.execute(
            sa.select(_conversations).where(_conversations.c.id == conversation_id)
        ).mappings().first()
        if row is None:
            raise ConversationNotFound(f"conversation {conversation_id!r} not found")
        return conversation_from_row(row)

    def _count_messages(self, conn: Connection, conversation_id: str) -> int:
        return int(
            conn.execute(
                sa.select(sa.func.count())
                .select_from(_messages)
                .where(_messages.c.conversation_id == conversation_id)
            ).scalar_one()
        )

    def _resolve_index(self, conn: Connection, conversation_id: str, index: int) -> int:
        """Validate ``index`` (negative counts from the end, like a list) and return the position."""
        count = self._count_messages(conn, conversation_id)
        position = index + count if index < 0 else index
        if not 0 <= position < count:
            raise MessageNotFound(
                f"conversation {conversation_id!r} has {count} message(s); "
                f"index {index} is out of range"
            )
        return position

    def _load(self, conn: Connection, conversation_id: str, *, with_messages: bool) -> Conversation:
        conversation = self._require_conversation(conn, conversation_id)
        rows = conn.execute(
            sa.select(_messages)
            .where(_messages.c.conversation_id == conversation_id)
            .order_by(_messages.c.position)
        ).mappings()
        messages = [message_from_row(row) for row in rows]
        conversation.message_count = len(messages)
        if with_messages:
            conversation.messages = messages
        return conversation

    def _insert_message(
        self,
        conn: Connection,
        conversation_id: str,
        position: int,
        role: str,
        speaker: str,
        swipes: list[str],
        swipe_id: int,
        created_at: float,
        extra: dict[str, Any],
    ) -> Message:
        conn.execute(
            _messages.insert().values(
                conversation_id=conversation_id,
                position=position,
                role=role,
                speaker=speaker,
                swipes=swipes,
                swipe_id=swipe_id,
                created_at=created_at,
                extra=extra,
            )
        )
        return Message(position, role, speaker, list(swipes), swipe_id, created_at, dict(extra))

    @once_more_if_disconnected
    def _update_message(
        self,
        conversation_id: str,
        index: int,
        change: Callable[[Message], tuple[list[str], int]],
        turn: TurnTicket | None = None,
        outcome: Mapping[str, Any] | None = None,
    ) -> Message:
        """Read-modify-write of one message's swipes in a single transaction."""
        with self._writing(turn, outcome) as conn:
            self._require_conversation(conn, conversation_id)
            position = self._resolve_index(conn, conversation_id, index)
            where = (_messages.c.conversation_id == conversation_id, _messages.c.position == position)
            row = conn.execute(sa.select(_messages).where(*where)).mappings().one()
            message = message_from_row(row)
            swipes, swipe_id = change(message)
            conn.execute(_messages.update().where(*where).values(swipes=swipes, swipe_id=swipe_id))
            self._touch(conn, conversation_id, self._clock())
            message.swipes, message.swipe_id = list(swipes), swipe_id
            return message

    def _touch(self, conn: Connection, conversation_id: str, now: float) -> None:
        """Bump ``updated_at`` so listings show recently active chats first."""
        conn.execute(
            _conversations.update()
            .where(_conversations.c.id == conversation_id)
            .values(updated_at=now)
        )


def _replace_shown(message: Message, text: str) -> tuple[list[str], int]:
    swipes = list(message.swipes)
    swipes[message.swipe_id] = text
    return swipes, message.swipe_id
