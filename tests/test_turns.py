"""Leased chat turns in the conversation store, on SQLite and on PostgreSQL.

Two stores on one database stand for two replicas. A clock that the test moves stands for time
passing, so a lease runs out without waiting for it (the renewal thread is checked in real time).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import sqlalchemy as sa

from kobold_api.chat.conversations import (
    MIGRATIONS, ConversationNotFound, ConversationStore, IdempotencyKeyReused, TurnBusy, TurnLost,
)
from kobold_api.chat.store_schema import turns


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'turns.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def replicas(database_url: str, clock: Clock) -> Iterator[tuple[ConversationStore, ConversationStore]]:
    first = ConversationStore(database_url, clock=clock, owner="r1", lease_seconds=30)
    second = ConversationStore(database_url, clock=clock, owner="r2", lease_seconds=30)
    yield first, second
    first.close()
    second.close()


def test_one_turn_at_a_time_across_replicas(replicas: tuple[ConversationStore, ConversationStore]) -> None:
    r1, r2 = replicas
    conversation = r1.create("Mira Vance", "Sam", ["Hello."])
    ticket = r1.claim_turn(conversation.id)
    with pytest.raises(TurnBusy):
        r2.claim_turn(conversation.id)
    with pytest.raises(TurnBusy):  # the same replica's second turn waits too
        r1.claim_turn(conversation.id, kind="edit")
    r1.add_turn(conversation.id, "Hi", "Welcome.", turn=ticket, outcome={"text": "Welcome."})
    second = r2.claim_turn(conversation.id)
    r2.add_turn(conversation.id, "Tea?", "Always.", turn=second, outcome={"text": "Always."})
    assert [m.text for m in r1.get(conversation.id).messages] == ["Hello.", "Hi", "Welcome.", "Tea?", "Always."]
    other = r1.create("Mira Vance", "Sam", [])
    r2.release_turn(r2.claim_turn(other.id))  # other conversations never wait
    with pytest.raises(ConversationNotFound):
        r1.claim_turn("no-such-id")


def test_an_expired_lease_fails_the_turn_and_its_late_reply_is_refused(
        replicas: tuple[ConversationStore, ConversationStore], clock: Clock) -> None:
    r1, r2 = replicas
    conversation = r1.create("Mira Vance", "Sam", ["Hello."])
    stalled = r1.claim_turn(conversation.id)
    clock.now += 29
    with pytest.raises(TurnBusy):
        r2.claim_turn(conversation.id)
    clock.now += 2  # r1 stopped renewing (died, or stalled past its lease)
    taken_over = r2.claim_turn(conversation.id)
    with pytest.raises(TurnLost):
        r1.add_turn(conversation.id, "Hi", "Too late.", turn=stalled, outcome={"text": "Too late."})
    r1.release_turn(stalled)  # leaves the new owner's turn alone
    r2.add_turn(conversation.id, "Hi", "On time.", turn=taken_over, outcome={"text": "On time."})
    assert [m.text for m in r2.get(conversation.id).messages] == ["Hello.", "Hi", "On time."]


def test_an_idempotency_key_is_answered_once(replicas: tuple[ConversationStore, ConversationStore],
                                             clock: Clock) -> None:
    r1, r2 = replicas
    conversation = r1.create("Mira Vance", "Sam", ["Hello."])
    first = r1.claim_turn(conversation.id, key="k1", fingerprint="body-a")
    r1.release_turn(first, "the client left")  # failed: the retry runs again
    retry = r2.claim_turn(conversation.id, key="k1", fingerprint="body-a")
    assert retry.replay is None and retry.attempt == 2 and retry.id == first.id
    with pytest.raises(TurnBusy):  # a retry while the turn runs waits for it
        r1.claim_turn(conversation.id, key="k1", fingerprint="body-a")
    outcome = {"text": "Welcome.", "finish_reason": "stop", "completion_tokens": 3}
    r2.add_turn(conversation.id, "Hi", "Welcome.", turn=retry, outcome=outcome)
    replayed = r1.claim_turn(conversation.id, key="k1", fingerprint="body-a")
    assert replayed.replay == outcome
    r1.release_turn(replayed)  # a replay holds nothing
    r1.release_turn(r1.claim_turn(conversation.id))
    with pytest.raises(IdempotencyKeyReused):
        r1.claim_turn(conversation.id, key="k1", fingerprint="body-b")
    assert len(r1.get(conversation.id).messages) == 3
    other = r1.create("Mira Vance", "Sam", [])
    assert r1.claim_turn(other.id, key="k1", fingerprint="body-b").replay is None  # keys are per conversation


def _lease_until(store: ConversationStore, ticket_id: int) -> float:
    with store.engine.connect() as conn:
        return float(conn.execute(sa.select(turns.c.lease_until).where(turns.c.id == ticket_id)).scalar_one())


def _wait_for(condition: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    """Poll ``condition`` until it holds; ``limit`` is only an upper bound for a stuck thread."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_a_running_turn_keeps_its_lease_by_renewal(database_url: str, clock: Clock) -> None:
    """The renewal thread runs in real time (every third of the lease); the lease is judged on the
    test's clock, so each round waits for a renewal to be seen and then moves time past the lease
    the turn had before it: without renewal, the other replica would take the conversation."""
    lease = 0.3
    with ConversationStore(database_url, clock=clock, owner="r1", lease_seconds=lease) as r1, \
            ConversationStore(database_url, clock=clock, owner="r2", lease_seconds=lease) as r2:
        conversation = r1.create("Mira Vance", "Sam", [])
        ticket = r1.claim_turn(conversation.id)
        assert _lease_until(r1, ticket.id) == clock.now + lease
        for _ in range(3):  # three whole leases in all
            earlier = _lease_until(r1, ticket.id)
            clock.now = earlier - lease / 10  # still inside the lease: a renewal from now on moves it on
            _wait_for(lambda: _lease_until(r1, ticket.id) == clock.now + lease, "the lease's renewal")
            clock.now = earlier + lease / 10  # past the lease the turn had before the renewal
            with pytest.raises(TurnBusy):
                r2.claim_turn(conversation.id)
        r1.add_turn(conversation.id, "Hi", "Still mine.", turn=ticket, outcome={})
        r2.release_turn(r2.claim_turn(conversation.id))


def test_a_claim_that_waited_for_the_row_lock_starts_after_it(postgres_url: str) -> None:
    """A claim blocked on the conversation row (another replica's transaction holds it) reads the
    time only once it has the row: the clock is never read while the other transaction is open."""
    import psycopg2

    holding = threading.Event()
    reads: list[bool] = []  # per clock read: whether the other transaction still held the row

    def clock() -> float:
        reads.append(holding.is_set())
        return time.time()

    with ConversationStore(postgres_url, clock=clock, owner="r1") as r1:
        conversation = r1.create("Mira Vance", "Sam", [])
        url = r1.engine.url
        other = psycopg2.connect(dbname=url.database, user=url.username, host=url.query["host"])
        claimed: list[Any] = []
        try:
            with other.cursor() as cursor:
                cursor.execute("SELECT id FROM conversations WHERE id = %s FOR UPDATE", (conversation.id,))
                holding.set()
                reads.clear()
                claimer = threading.Thread(target=lambda: claimed.append(r1.claim_turn(conversation.id)))
                claimer.start()

                def claim_waits_for_the_row() -> bool:
                    cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                   "AND wait_event_type = 'Lock'")
                    return cursor.fetchone()[0] == 1

                _wait_for(claim_waits_for_the_row, "the claim to wait for the row lock")
            holding.clear()
            other.commit()  # the other replica's transaction ends
            claimer.join(30)
        finally:
            other.close()
        assert claimed and claimed[0].replay is None
        assert reads and not any(reads), reads  # no time was read while the claim waited


def test_deleting_a_conversation_ends_its_running_turn(replicas: tuple[ConversationStore, ConversationStore]) -> None:
    r1, r2 = replicas
    conversation = r1.create("Mira Vance", "Sam", ["Hello."])
    ticket = r1.claim_turn(conversation.id)
    r2.delete(conversation.id)
    with pytest.raises(ConversationNotFound):
        r1.add_turn(conversation.id, "Hi", "Gone.", turn=ticket, outcome={})
    r1.release_turn(ticket)


def test_replicas_starting_together_migrate_once(database_url: str) -> None:
    """The first start of several replicas on a new database: one creates the tables, the
    others wait for it (PostgreSQL's CREATE TABLE collided here before the advisory lock)."""
    stores: list[ConversationStore] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_store() -> None:
        start.wait()
        try:
            stores.append(ConversationStore(database_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert errors == []
        assert [store.schema_version() for store in stores] == [len(MIGRATIONS)] * 4
    finally:
        for store in stores:
            store.close()
