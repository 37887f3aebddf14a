"""Tests for the persistent conversation store (real SQLite files under tmp_path)."""

from __future__ import annotations

import json
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kobold_api.chat.conversations import (
    MIGRATIONS,
    Conversation,
    ConversationNotFound,
    ConversationStore,
    Message,
    MessageNotFound,
    SchemaVersionError,
    StoreError,
    SwipeNotFound,
)


class FakeClock:
    """Deterministic, strictly increasing time so ordering by updated_at is testable."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start
        self._guard = threading.Lock()

    def __call__(self) -> float:
        with self._guard:
            self.now += 1.0
            return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir: Path, clock: FakeClock) -> Iterator[ConversationStore]:
    opened = ConversationStore.for_data_dir(data_dir, clock=clock)
    yield opened
    opened.close()


def make_chat(store: ConversationStore, turns: int = 0) -> Conversation:
    """A conversation with a two-swipe greeting plus ``turns`` user/character exchanges."""
    conversation = store.create("Alice", "Bob", ["Hello!", "Hi there!"])
    for n in range(turns):
        store.add_turn(conversation.id, f"user {n}", f"reply {n}", "Alice")
    return store.get(conversation.id)


def texts(conversation: Conversation) -> list[str]:
    return [m.text for m in conversation.messages]


# --------------------------------------------------------------------------- create / get / list


def test_create_makes_greeting_message_with_all_greetings_as_swipes(store: ConversationStore) -> None:
    conversation = store.create("Alice", "Bob", ["Hello!", "Hi there!", "Yo."])

    assert conversation.character == "Alice"
    assert conversation.user_name == "Bob"
    assert conversation.title == "Chat with Alice"
    assert conversation.created_at == conversation.updated_at
    assert re.fullmatch(r"[A-Za-z0-9_-]{8,22}", conversation.id)
    [greeting] = conversation.messages
    assert greeting.index == 0
    assert greeting.role == "character"
    assert greeting.speaker == "Alice"
    assert greeting.swipes == ["Hello!", "Hi there!", "Yo."]
    assert greeting.swipe_id == 0
    assert greeting.text == "Hello!"
    assert store.get(conversation.id) == conversation


def test_create_without_greetings_has_no_messages(store: ConversationStore) -> None:
    empty = store.create("Alice", "Bob", [])
    only_blank = store.create("Alice", "Bob", [""])
    assert store.get(empty.id).messages == []
    assert store.get(only_blank.id).messages == []


def test_create_skips_empty_greetings_and_keeps_explicit_title(store: ConversationStore) -> None:
    conversation = store.create("Alice", "Bob", ["", "Alt greeting"], title="Evening chat")
    assert conversation.title == "Evening chat"
    assert [m.swipes for m in conversation.messages] == [["Alt greeting"]]


def test_ids_are_unique(store: ConversationStore) -> None:
    ids = {store.create("Alice", "Bob", []).id for _ in range(50)}
    assert len(ids) == 50


def test_list_orders_by_activity_filters_by_character_and_counts_messages(store: ConversationStore) -> None:
    first = store.create("Alice", "Bob", ["hi"])
    second = store.create("Carol", "Bob", [])
    third = store.create("Alice", "Bob", [])
    store.add_turn(first.id, "ping", "pong", "Alice")  # most recent activity now

    listed = store.list()
    assert [c.id for c in listed] == [first.id, third.id, second.id]
    assert [c.message_count for c in listed] == [3, 0, 0]
    assert all(c.messages == [] for c in listed)
    assert [c.id for c in store.list("Alice")] == [first.id, third.id]
    assert [c.id for c in store.list(character="Carol")] == [second.id]
    assert store.list("Nobody") == []


def test_get_missing_conversation_raises_not_found(store: ConversationStore) -> None:
    with pytest.raises(ConversationNotFound) as caught:
        store.get("does-not-exist")
    assert isinstance(caught.value, KeyError)
    assert isinstance(caught.value, StoreError)
    assert str(caught.value) == "conversation 'does-not-exist' not found"


def test_rename(store: ConversationStore) -> None:
    conversation = make_chat(store)
    renamed = store.rename(conversation.id, "New title")
    assert renamed.title == "New title"
    assert renamed.updated_at > conversation.updated_at
    assert renamed.message_count == 1
    assert store.get(conversation.id).title == "New title"


def test_delete_removes_conversation_and_its_messages(store: ConversationStore) -> None:
    keep = make_chat(store, turns=1)
    gone = make_chat(store, turns=2)

    store.delete(gone.id)

    with pytest.raises(ConversationNotFound):
        store.get(gone.id)
    assert [c.id for c in store.list()] == [keep.id]
    with store.engine.connect() as conn:
        remaining = conn.exec_driver_sql(
            "SELECT count(*) FROM messages WHERE conversation_id = ?", (gone.id,)
        ).scalar()
    assert remaining == 0
    assert len(store.get(keep.id).messages) == 3


# --------------------------------------------------------------------------- message operations


def test_add_turn_appends_user_message_and_reply(store: ConversationStore) -> None:
    conversation = make_chat(store)

    added = store.add_turn(conversation.id, "How are you?", "Great!", "Alice", extra={"seed": 7})

    assert [(m.index, m.role, m.speaker, m.text) for m in added] == [
        (1, "user", "Bob", "How are you?"),
        (2, "character", "Alice", "Great!"),
    ]
    assert added[1].extra == {"seed": 7}
    after = store.get(conversation.id)
    assert after.messages[1:] == added
    assert after.updated_at > conversation.updated_at


def test_add_turn_without_user_text_appends_only_the_reply(store: ConversationStore) -> None:
    conversation = make_chat(store)
    added = store.add_turn(conversation.id, None, "*waves*", "Alice")
    assert [(m.index, m.role) for m in added] == [(1, "character")]
    assert texts(store.get(conversation.id)) == ["Hello!", "*waves*"]


def test_add_turn_speaker_defaults_to_character(store: ConversationStore) -> None:
    conversation = make_chat(store)
    [reply] = store.add_turn(conversation.id, None, "hm")
    assert reply.speaker == "Alice"


def test_add_message_appends_system_note_and_rejects_unknown_roles(store: ConversationStore) -> None:
    conversation = make_chat(store)
    note = store.add_message(conversation.id, "system", "[Time passes]")
    assert (note.index, note.role, note.speaker, note.text) == (1, "system", "Alice", "[Time passes]")
    user = store.add_message(conversation.id, "user", "hello?")
    assert user.speaker == "Bob"
    with pytest.raises(ValueError, match="role must be one of"):
        store.add_message(conversation.id, "narrator", "x")
    assert len(store.get(conversation.id).messages) == 3


def test_edit_message_changes_only_the_shown_swipe(store: ConversationStore) -> None:
    conversation = make_chat(store)
    store.set_swipe(conversation.id, 0, 1)

    edited = store.edit_message(conversation.id, 0, "Hi there, edited!")

    assert edited.swipes == ["Hello!", "Hi there, edited!"]
    assert edited.swipe_id == 1
    assert edited.text == "Hi there, edited!"
    assert store.get(conversation.id).messages[0] == edited


def test_delete_message_renumbers_the_rest(store: ConversationStore) -> None:
    conversation = make_chat(store, turns=2)  # greeting, user 0, reply 0, user 1, reply 1

    store.delete_message(conversation.id, 1)
    after = store.get(conversation.id)
    assert texts(after) == ["Hello!", "reply 0", "user 1", "reply 1"]
    assert [m.index for m in after.messages] == [0, 1, 2, 3]

    store.delete_message(conversation.id, -1)  # negative indexes count from the end
    store.delete_message(conversation.id, 0)
    after = store.get(conversation.id)
    assert texts(after) == ["reply 0", "user 1"]
    assert [m.index for m in after.messages] == [0, 1]
    # Appending after renumbering continues at the right position.
    store.add_turn(conversation.id, "again", "sure", "Alice")
    assert [m.index for m in store.get(conversation.id).messages] == [0, 1, 2, 3]


def test_set_swipe_shows_another_alternative(store: ConversationStore) -> None:
    conversation = make_chat(store)
    shown = store.set_swipe(conversation.id, 0, 1)
    assert (shown.swipe_id, shown.text) == (1, "Hi there!")
    assert store.get(conversation.id).messages[0].text == "Hi there!"


def test_set_swipe_out_of_range_raises_and_changes_nothing(store: ConversationStore) -> None:
    conversation = make_chat(store)
    for bad in (2, -1):
        with pytest.raises(SwipeNotFound, match="out of range") as caught:
            store.set_swipe(conversation.id, 0, bad)
        assert isinstance(caught.value, IndexError)
    assert store.get(conversation.id) == conversation


def test_add_swipe_keeps_old_texts_and_shows_the_new_one(store: ConversationStore) -> None:
    conversation = make_chat(store, turns=1)

    regenerated = store.add_swipe(conversation.id, -1, "reply 0, take two")

    assert regenerated.index == 2
    assert regenerated.swipes == ["reply 0", "reply 0, take two"]
    assert regenerated.swipe_id == 1
    assert texts(store.get(conversation.id))[-1] == "reply 0, take two"
    # Swiping back restores the first generation.
    assert store.set_swipe(conversation.id, 2, 0).text == "reply 0"


def test_append_to_message_continues_the_shown_swipe(store: ConversationStore) -> None:
    conversation = make_chat(store, turns=1)
    store.add_swipe(conversation.id, 2, "Second try")

    continued = store.append_to_message(conversation.id, 2, " and more.")

    assert continued.text == "Second try and more."
    assert continued.swipes == ["reply 0", "Second try and more."]
    assert store.get(conversation.id).messages[2] == continued


def test_export_is_json_ready_and_complete(store: ConversationStore) -> None:
    conversation = make_chat(store, turns=1)
    store.add_swipe(conversation.id, 2, "alt reply")

    exported = store.export(conversation.id)

    round_tripped = json.loads(json.dumps(exported))
    assert round_tripped == exported
    assert exported["id"] == conversation.id
    assert exported["character"] == "Alice"
    assert exported["user_name"] == "Bob"
    assert exported["format"] == "kobold_api.conversation"
    assert [m["swipes"] for m in exported["messages"]] == [
        ["Hello!", "Hi there!"],
        ["user 0"],
        ["reply 0", "alt reply"],
    ]
    assert [m["text"] for m in exported["messages"]] == ["Hello!", "user 0", "alt reply"]
    assert [m["role"] for m in exported["messages"]] == ["character", "user", "character"]


def test_to_dict_of_message() -> None:
    message = Message(3, "character", "Alice", ["a", "b"], 1, 12.5, {"k": 1})
    assert message.to_dict() == {
        "index": 3,
        "role": "character",
        "speaker": "Alice",
        "text": "b",
        "swipes": ["a", "b"],
        "swipe_id": 1,
        "created_at": 12.5,
        "extra": {"k": 1},
    }


def test_unicode_round_trips(store: ConversationStore) -> None:
    conversation = store.create("Ärger", "ユーザー", ["こんにちは 👋"])
    store.add_turn(conversation.id, "¿Qué tal?", "Très bien — 谢谢", "Ärger")
    assert texts(store.get(conversation.id)) == ["こんにちは 👋", "¿Qué tal?", "Très bien — 谢谢"]


# --------------------------------------------------------------------------- errors


MESSAGE_OPERATIONS: dict[str, Callable[[ConversationStore, str, int], Any]] = {
    "edit_message": lambda s, cid, i: s.edit_message(cid, i, "x"),
    "delete_message": lambda s, cid, i: s.delete_message(cid, i),
    "set_swipe": lambda s, cid, i: s.set_swipe(cid, i, 0),
    "add_swipe": lambda s, cid, i: s.add_swipe(cid, i, "x"),
    "append_to_message": lambda s, cid, i: s.append_to_message(cid, i, "x"),
}

CONVERSATION_OPERATIONS: dict[str, Callable[[ConversationStore, str], Any]] = {
    "get": lambda s, cid: s.get(cid),
    "rename": lambda s, cid: s.rename(cid, "t"),
    "delete": lambda s, cid: s.delete(cid),
    "export": lambda s, cid: s.export(cid),
    "add_turn": lambda s, cid: s.add_turn(cid, "u", "r", "Alice"),
    "add_message": lambda s, cid: s.add_message(cid, "system", "n"),
    **{name: (lambda op: lambda s, cid: op(s, cid, 0))(op) for name, op in MESSAGE_OPERATIONS.items()},
}


@pytest.mark.parametrize("operation", CONVERSATION_OPERATIONS.values(), ids=CONVERSATION_OPERATIONS.keys())
def test_every_operation_raises_not_found_for_unknown_conversation(
    store: ConversationStore, operation: Callable[[ConversationStore, str], Any]
) -> None:
    make_chat(store)
    with pytest.raises(ConversationNotFound, match="'nope' not found"):
        operation(store, "nope")


@pytest.mark.parametrize("operation", MESSAGE_OPERATIONS.values(), ids=MESSAGE_OPERATIONS.keys())
@pytest.mark.parametrize("index", [3, 99, -4])
def test_bad_message_index_raises_message_not_found(
    store: ConversationStore, operation: Callable[[ConversationStore, str, int], Any], index: int
) -> None:
    conversation = make_chat(store, turns=1)  # 3 messages: valid indexes 0..2 and -1..-3
    with pytest.raises(MessageNotFound, match=f"has 3 message\\(s\\); index {index} is out of range") as caught:
        operation(store, conversation.id, index)
    assert isinstance(caught.value, KeyError)
    assert isinstance(caught.value, IndexError)
    assert store.get(conversation.id) == conversation


def test_message_ops_on_empty_conversation_raise(store: ConversationStore) -> None:
    conversation = store.create("Alice", "Bob", [])
    with pytest.raises(MessageNotFound, match="has 0 message"):
        store.edit_message(conversation.id, 0, "x")


# --------------------------------------------------------------------------- persistence


def test_everything_survives_a_restart(data_dir: Path, clock: FakeClock) -> None:
    before = ConversationStore.for_data_dir(data_dir, clock=clock)
    conversation = make_chat(before, turns=2)
    before.add_swipe(conversation.id, -1, "alt")
    before.set_swipe(conversation.id, 0, 1)
    before.edit_message(conversation.id, 1, "edited")
    before.rename(conversation.id, "Saved")
    other = before.create("Carol", "Bob", [], title="Other")
    expected = [before.get(c.id).to_dict() for c in before.list()]
    before.close()

    after = ConversationStore.for_data_dir(data_dir, clock=clock)
    try:
        assert [after.get(c.id).to_dict() for c in after.list()] == expected
        assert {c.id for c in after.list()} == {conversation.id, other.id}
        # And it keeps working after the restart.
        after.add_turn(conversation.id, "back again", "welcome back", "Alice")
        assert after.get(conversation.id).messages[-1].text == "welcome back"
    finally:
        after.close()


def test_for_data_dir_creates_the_folder_and_database_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "nested" / "deeper"
    with ConversationStore.for_data_dir(data_dir) as opened:
        opened.create("Alice", "Bob", ["hi"])
    assert (data_dir / "conversations.db").is_file()


def test_sqlite_url_creates_parent_folder(tmp_path: Path) -> None:
    db_file = tmp_path / "a" / "b" / "chats.sqlite"
    with ConversationStore(f"sqlite:///{db_file}") as opened:
        opened.create("Alice", "Bob", [])
    assert db_file.is_file()


def test_in_memory_sqlite_works_across_threads() -> None:
    with ConversationStore("sqlite://") as opened:
        conversation = opened.create("Alice", "Bob", ["hi"])
        seen: list[list[str]] = []
        worker = threading.Thread(target=lambda: seen.append(texts(opened.get(conversation.id))))
        worker.start()
        worker.join(5)
        assert seen == [["hi"]]


def test_sqlite_runs_in_wal_mode_with_foreign_keys_and_busy_timeout(store: ConversationStore, data_dir: Path) -> None:
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() > 0
    # WAL is a property of the file, visible to any other client too.
    raw = sqlite3.connect(data_dir / "conversations.db")
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        raw.close()


# --------------------------------------------------------------------------- atomicity


def test_add_turn_is_atomic_when_storing_the_reply_fails(
    store: ConversationStore, monkeypatch: pytest.MonkeyPatch, data_dir: Path, clock: FakeClock
) -> None:
    conversation = make_chat(store, turns=1)
    real_insert = store._insert_message
    inserted_roles: list[str] = []

    def failing_insert(conn: Connection, conversation_id: str, position: int, role: str, *args: Any) -> Message:
        if role == "character":
            raise RuntimeError("disk on fire")
        inserted_roles.append(role)
        return real_insert(conn, conversation_id, position, role, *args)

    monkeypatch.setattr(store, "_insert_message", failing_insert)

    with pytest.raises(RuntimeError, match="disk on fire"):
        store.add_turn(conversation.id, "lost message", "never stored", "Alice")

    assert inserted_roles == ["user"]  # the user message really was written before the failure
    assert store.get(conversation.id) == conversation  # ...and rolled back, updated_at included
    monkeypatch.undo()
    store.close()
    with ConversationStore.for_data_dir(data_dir, clock=clock) as reopened:
        assert reopened.get(conversation.id) == conversation


def test_create_is_atomic_when_storing_the_greeting_fails(
    store: ConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_insert(*args: Any) -> Message:
        raise RuntimeError("boom")

    monkeypatch.setattr(store, "_insert_message", failing_insert)
    with pytest.raises(RuntimeError, match="boom"):
        store.create("Alice", "Bob", ["hi"])
    assert store.list() == []


def test_delete_message_is_atomic_when_touching_fails(
    store: ConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    conversation = make_chat(store, turns=1)

    def failing_touch(*args: Any) -> None:
        raise RuntimeError("late failure")

    monkeypatch.setattr(store, "_touch", failing_touch)
    with pytest.raises(RuntimeError, match="late failure"):
        store.delete_message(conversation.id, 0)
    assert store.get(conversation.id) == conversation


# --------------------------------------------------------------------------- per-conversation lock


def test_lock_is_one_lock_per_conversation(store: ConversationStore) -> None:
    assert store.lock("a") is store.lock("a")
    assert store.lock("a") is not store.lock("b")


def _blocked_at(thread: threading.Thread, code: Any, line: int) -> bool:
    """Whether ``thread`` stands at ``line`` of ``code`` with no Python frame above it: inside a C
    call made there, such as a lock's acquire that waits."""
    frame = sys._current_frames().get(thread.ident or -1)
    return frame is not None and frame.f_code is code and frame.f_lineno == line


def test_lock_blocks_a_second_turn_until_the_first_finishes(store: ConversationStore) -> None:
    conversation = make_chat(store)
    first_inside = threading.Event()
    release_first = threading.Event()
    second_inside = threading.Event()
    second_lock: list[Any] = []

    def first_turn() -> None:
        with store.lock(conversation.id):
            first_inside.set()
            release_first.wait(60)

    def second_turn() -> None:
        second_lock.append(store.lock(conversation.id))
        with second_lock[0]:  # the line the second turn must wait at
            second_inside.set()

    waiting_line = second_turn.__code__.co_firstlineno + 2
    first = threading.Thread(target=first_turn)
    second = threading.Thread(target=second_turn)
    first.start()
    assert first_inside.wait(60)
    held = store.lock(conversation.id)
    assert held.locked()  # the first turn holds the conversation's one lock
    second.start()
    # The second turn reaches its `with` and stays there, in the lock's acquire: it waits for the
    # lock, whatever the machine's speed, rather than merely not having got there yet.
    deadline = time.monotonic() + 60
    while not _blocked_at(second, second_turn.__code__, waiting_line):
        assert not second_inside.is_set(), "second turn entered while the first held the lock"
        assert time.monotonic() < deadline, "the second turn never reached the lock"
        time.sleep(0.005)
    assert second_lock == [held] and second_lock[0] is held  # the lock the first turn holds
    assert not second_inside.is_set() and held.locked()
    release_first.set()
    assert second_inside.wait(60)
    first.join(60)
    second.join(60)
    assert not held.locked()


def test_locked_turns_store_consistent_history(store: ConversationStore) -> None:
    """Each reply must be generated from the history that it ends up following."""
    conversation = make_chat(store)

    def chat_turn(user_text: str) -> None:
        with store.lock(conversation.id):
            seen = len(store.get(conversation.id).messages)
            time.sleep(0.05)  # "generation" is slow, so an unlocked turn would interleave
            store.add_turn(conversation.id, user_text, f"reply after {seen} messages", "Alice")

    workers = [threading.Thread(target=chat_turn, args=(f"user {n}",)) for n in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)

    messages = store.get(conversation.id).messages
    assert len(messages) == 9
    replies = [m for m in messages if m.role == "character"][1:]
    assert [r.text for r in replies] == [f"reply after {r.index - 1} messages" for r in replies]


def test_different_conversations_do_not_block_each_other(store: ConversationStore) -> None:
    one = make_chat(store)
    two = make_chat(store)
    both_inside = threading.Barrier(2, timeout=60)
    failures: list[BaseException] = []

    def hold(conversation_id: str) -> None:
        try:
            with store.lock(conversation_id):
                both_inside.wait()
        except BaseException as error:  # noqa: BLE001 - reported to the main thread
            failures.append(error)

    workers = [threading.Thread(target=hold, args=(cid,)) for cid in (one.id, two.id)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)
    assert failures == []


def test_concurrent_writers_on_separate_conversations(store: ConversationStore) -> None:
    conversations = [make_chat(store) for _ in range(4)]
    failures: list[BaseException] = []

    def chatter(conversation_id: str) -> None:
        try:
            for n in range(15):
                store.add_turn(conversation_id, f"u{n}", f"r{n}", "Alice")
                store.get(conversation_id)
        except BaseException as error:  # noqa: BLE001 - reported to the main thread
            failures.append(error)

    workers = [threading.Thread(target=chatter, args=(c.id,)) for c in conversations]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert failures == []
    assert [c.message_count for c in store.list()] == [31] * 4


# --------------------------------------------------------------------------- migrations


def _column_names(store: ConversationStore, table: str) -> set[str]:
    return {column["name"] for column in sa.inspect(store.engine).get_columns(table)}


def test_fresh_database_is_at_the_latest_version(store: ConversationStore) -> None:
    assert store.schema_version() == len(MIGRATIONS) == 2
    assert {"conversations", "messages", "turns", "schema_version"} <= set(sa.inspect(store.engine).get_table_names())


def test_a_version_1_database_gains_the_turns_table(data_dir: Path) -> None:
    with ConversationStore.for_data_dir(data_dir, migrations=MIGRATIONS[:1]) as v1:
        conversation = make_chat(v1, turns=2)
        assert "turns" not in sa.inspect(v1.engine).get_table_names()
    with ConversationStore.for_data_dir(data_dir) as v2:
        assert v2.schema_version() == 2
        assert v2.get(conversation.id) == conversation
        ticket = v2.claim_turn(conversation.id)
        v2.add_turn(conversation.id, "And now?", "Now we wait.", turn=ticket, outcome={"text": "Now we wait."})
        assert v2.get(conversation.id).messages[-1].text == "Now we wait."


def test_existing_database_is_upgraded_by_a_new_step(data_dir: Path) -> None:
    latest = len(MIGRATIONS)
    with ConversationStore.for_data_dir(data_dir) as v1:
        conversation = make_chat(v1, turns=1)
        assert v1.schema_version() == latest

    runs: list[int] = []

    def add_pinned_column(conn: Connection) -> None:
        runs.append(1)
        conn.exec_driver_sql("ALTER TABLE conversations ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0")

    upgraded_steps = (*MIGRATIONS, add_pinned_column)
    with ConversationStore.for_data_dir(data_dir, migrations=upgraded_steps) as v2:
        assert v2.schema_version() == latest + 1
        assert "pinned" in _column_names(v2, "conversations")
        assert v2.get(conversation.id) == conversation  # data carried over
    with ConversationStore.for_data_dir(data_dir, migrations=upgraded_steps) as again:
        assert again.schema_version() == latest + 1
    assert runs == [1]  # applied exactly once


def test_failing_migration_step_leaves_the_database_at_the_old_version(data_dir: Path) -> None:
    with ConversationStore.for_data_dir(data_dir) as v1:
        conversation = make_chat(v1)

    def half_done(conn: Connection) -> None:
        conn.exec_driver_sql("CREATE TABLE tags (name TEXT)")
        conn.exec_driver_sql("ALTER TABLE conversations ADD COLUMN pinned INTEGER")
        raise RuntimeError("migration bug")

    with pytest.raises(RuntimeError, match="migration bug"):
        ConversationStore.for_data_dir(data_dir, migrations=(*MIGRATIONS, half_done))

    with ConversationStore.for_data_dir(data_dir) as reopened:
        assert reopened.schema_version() == len(MIGRATIONS)
        assert "tags" not in sa.inspect(reopened.engine).get_table_names()
        assert "pinned" not in _column_names(reopened, "conversations")
        assert reopened.get(conversation.id) == conversation


def test_database_from_a_newer_version_is_refused_untouched(data_dir: Path) -> None:
    def future_step(conn: Connection) -> None:
        conn.exec_driver_sql("CREATE TABLE future_feature (x INTEGER)")

    with ConversationStore.for_data_dir(data_dir, migrations=(*MIGRATIONS, future_step)) as newer:
        conversation = make_chat(newer)
    db_file = data_dir / "conversations.db"
    size_before = db_file.stat().st_size
    assert not Path(f"{db_file}-wal").exists() or Path(f"{db_file}-wal").stat().st_size == 0

    with pytest.raises(SchemaVersionError, match="version 3.*only knows up to version 2"):
        ConversationStore.for_data_dir(data_dir)

    assert db_file.stat().st_size == size_before
    with ConversationStore.for_data_dir(data_dir, migrations=(*MIGRATIONS, future_step)) as still_newer:
        assert still_newer.schema_version() == 3
        assert "future_feature" in sa.inspect(still_newer.engine).get_table_names()
        assert still_newer.get(conversation.id) == conversation
