"""Leased chat turns: how any number of server processes on one database take turns on a conversation.

A chat turn is "read the history -> generate (slow) -> store the reply". Within one process a lock
keeps two turns on one conversation apart; across replicas the database does, with a row in
``turns`` per running turn and no transaction held while the model generates:

1. **Claim** (one short transaction, the conversation row locked with ``SELECT ... FOR UPDATE`` on
   PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serializes writers anyway): turns whose lease ran out
   are marked ``failed``; if another turn still runs, the caller waits and claims again; else a
   row ``running`` is written with this process as ``owner`` and ``lease_until`` = now + lease.
2. **Generate**, outside any transaction. A :class:`LeaseKeeper` thread renews the lease of every
   turn this process runs, every third of the lease. A process that dies (kill -9, a lost machine)
   stops renewing; once the lease has run out the next claim marks the turn failed, nothing of it
   having been stored, so every turn that was answered before is intact.
3. **Complete**, in the same transaction that stores the reply: the row must still be this
   attempt's and ``running`` (a fence: a replica that stalled past its lease cannot store a reply
   after another took over), then it becomes ``done`` with what the turn answered.

With an ``Idempotency-Key`` the row also answers retries: a key whose turn is done is answered
from the row (the reply is not generated twice); one still running is waited for; one that failed
runs again. The same key with a different request is refused. Finished rows are kept for
:data:`KEEP_FINISHED_SECONDS`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .store_errors import ConversationNotFound, IdempotencyKeyReused, TurnLost
from .store_schema import conversations, turns

log = logging.getLogger(__name__)

#: How long finished turns (and so their idempotency keys) are kept.
KEEP_FINISHED_SECONDS = 24 * 3600.0

RUNNING, DONE, FAILED = "running", "done", "failed"


class TurnBusy(Exception):
    """Another turn on the conversation is running (on this replica or another): wait and retry."""


@dataclass(frozen=True)
class TurnTicket:
    """A claimed turn: what :func:`complete` and :func:`release` check the row against.

    ``replay`` is set instead when the idempotency key's turn was already done: the stored
    outcome, to be answered without generating.
    """

    id: int
    conversation_id: str
    owner: str
    attempt: int
    replay: Mapping[str, Any] | None = None


def claim(conn: Connection, conversation_id: str, owner: str, clock: Callable[[], float], lease_seconds: float, *,
          kind: str = "turn", key: str | None = None, fingerprint: str = "") -> TurnTicket:
    """Claim the conversation for one turn (see the module docs); raises :class:`TurnBusy` while
    another runs, :class:`IdempotencyKeyReused` when ``key`` was used for another request.

    ``clock`` is read only once the conversation row is locked: a claim that waited for the lock
    (another replica completing its turn) neither records a start before that turn's end nor
    judges leases by the time it began waiting. The start is read again after the check for a
    running turn, so it also follows a completion that committed while this claim held the lock.
    """
    found = conn.execute(sa.select(conversations.c.id).where(conversations.c.id == conversation_id)
                         .with_for_update()).first()
    if found is None:
        raise ConversationNotFound(f"conversation {conversation_id!r} not found")
    now = clock()
    of_conversation = turns.c.conversation_id == conversation_id
    conn.execute(turns.update().where(of_conversation, turns.c.status == RUNNING, turns.c.lease_until < now)
                 .values(status=FAILED, finished_at=now, error="lease expired: the replica running it stopped"))
    conn.execute(turns.delete().where(of_conversation, turns.c.status != RUNNING,
                                      turns.c.finished_at < now - KEEP_FINISHED_SECONDS))
    earlier = None
    if key is not None:
        earlier = conn.execute(sa.select(turns).where(of_conversation, turns.c.idempotency_key == key)
                               ).mappings().first()
        if earlier is not None:
            if earlier["fingerprint"] != fingerprint:
                raise IdempotencyKeyReused(
                    f"the Idempotency-Key {key!r} was already used for another request on this conversation")
            if earlier["status"] == DONE:
                return TurnTicket(earlier["id"], conversation_id, earlier["owner"], earlier["attempt"],
                                  replay=dict(earlier["outcome"] or {}))
    if conn.execute(sa.select(turns.c.id).where(of_conversation, turns.c.status == RUNNING)).first() is not None:
        raise TurnBusy(conversation_id)
    started = max(now, clock())
    values = dict(status=RUNNING, owner=owner, lease_until=started + lease_seconds, started_at=started,
                  finished_at=None, outcome=None, error=None)
    if earlier is not None:  # a retry of a turn that failed: run it again under the same key
        attempt = earlier["attempt"] + 1
        conn.execute(turns.update().where(turns.c.id == earlier["id"]).values(attempt=attempt, **values))
        return TurnTicket(earlier["id"], conversation_id, owner, attempt)
    result = conn.execute(turns.insert().values(conversation_id=conversation_id, idempotency_key=key,
                                                fingerprint=fingerprint, kind=kind, attempt=1, **values))
    return TurnTicket(int(result.inserted_primary_key[0]), conversation_id, owner, 1)


def complete(conn: Connection, ticket: TurnTicket, now: float, outcome: Mapping[str, Any]) -> None:
    """Mark the claimed turn done with ``outcome``, in the transaction that stores its reply.

    Raises :class:`TurnLost` (rolling the reply back with it) when the row is no longer this
    attempt's running turn.
    """
    done = conn.execute(turns.update().where(turns.c.id == ticket.id, turns.c.status == RUNNING,
                                             turns.c.owner == ticket.owner, turns.c.attempt == ticket.attempt)
                        .values(status=DONE, finished_at=now, lease_until=now, outcome=dict(outcome)))
    if done.rowcount != 1:
        raise TurnLost("this turn ran past its lease and was given up (another turn may have taken the "
                       "conversation over); the reply was not stored")


def release(conn: Connection, ticket: TurnTicket, now: float, error: str) -> None:
    """End a turn that stored nothing: kept as ``failed`` under an idempotency key (so the retry
    runs again), removed otherwise. A row that is no longer this attempt's is left alone."""
    mine = (turns.c.id == ticket.id, turns.c.status == RUNNING, turns.c.owner == ticket.owner,
            turns.c.attempt == ticket.attempt)
    conn.execute(turns.update().where(*mine, turns.c.idempotency_key.is_not(None))
                 .values(status=FAILED, finished_at=now, lease_until=now, error=error[:500]))
    conn.execute(turns.delete().where(*mine, turns.c.idempotency_key.is_(None)))


def renew(conn: Connection, ids: list[int], owner: str, until: float) -> int:
    """Extend the leases of this owner's running turns ``ids``; returns how many were still running."""
    if not ids:
        return 0
    return conn.execute(turns.update().where(turns.c.id.in_(ids), turns.c.owner == owner,
                                             turns.c.status == RUNNING).values(lease_until=until)).rowcount


class LeaseKeeper:
    """Renews the leases of the turns one process runs, every third of the lease, on a daemon thread
    started with the first turn. ``renew_all(ids)`` is the store's one-transaction renewal."""

    def __init__(self, lease_seconds: float, renew_all: Callable[[list[int]], None]) -> None:
        self.lease_seconds = lease_seconds
        self._renew_all = renew_all
        self._ids: set[int] = set()
        self._guard = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def hold(self, turn_id: int) -> None:
        with self._guard:
            self._ids.add(turn_id)
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._run, name="kobold-turn-leases", daemon=True)
                self._thread.start()

    def drop(self, turn_id: int) -> None:
        with self._guard:
            self._ids.discard(turn_id)

    def held(self) -> list[int]:
        with self._guard:
            return sorted(self._ids)

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._wake.wait(self.lease_seconds / 3):
            ids = self.held()
            if not ids:
                continue
            try:
                self._renew_all(ids)
            except Exception:  # the database is away for a moment: try again next time, loudly
                log.warning("could not renew the leases of %d running chat turn(s)", len(ids), exc_info=True)
