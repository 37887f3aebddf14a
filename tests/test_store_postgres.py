"""The conversation store on PostgreSQL: any SQLAlchemy URL works, not only the SQLite default.

A throwaway PostgreSQL cluster is started for the session (unix socket only, in a temp dir)
when this machine has the server binaries; otherwise the tests are skipped and say why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest

from kobold_api.chat.conversations import ConversationStore

pytest.importorskip("psycopg2", reason="psycopg2 is not installed")


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    run_as: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser to start PostgreSQL as another user")
        run_as = ["runuser", "-u", "nobody", "--"]
    root = Path(tempfile.mkdtemp(prefix="kobold-pg-"))
    if run_as:
        shutil.chown(root, user="nobody")
    data = root / "data"
    subprocess.run([*run_as, initdb, "-D", str(data), "-A", "trust", "-U", "kobold"], check=True,
                   capture_output=True, timeout=120)
    subprocess.run([*run_as, pg_ctl, "-D", str(data), "-o", f"-k {root} -h ''", "-l", str(root / "log"),
                    "-w", "start"], check=True, capture_output=True, timeout=60)
    try:
        yield f"postgresql+psycopg2://kobold@/postgres?host={root}"
    finally:
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def test_store_operations_on_postgresql(postgres_url: str) -> None:
    store = ConversationStore(postgres_url)
    try:
        conversation = store.create("Mira Vance", "Sam", ["Hello there.", "Ahoy."])
        store.add_turn(conversation.id, "Hi!", "Welcome to the lighthouse.", "Mira Vance")
        store.add_swipe(conversation.id, -1, "Come in out of the rain.")
        store.append_to_message(conversation.id, -1, " Tea?")
        store.edit_message(conversation.id, 1, "Hi there!")
        loaded = store.get(conversation.id)
        assert [m.role for m in loaded.messages] == ["character", "user", "character"]
        assert loaded.messages[0].swipes == ["Hello there.", "Ahoy."]
        assert loaded.messages[1].text == "Hi there!"
        assert loaded.messages[2].swipes == ["Welcome to the lighthouse.", "Come in out of the rain. Tea?"]
        assert store.export(conversation.id)["messages"][2]["swipe_id"] == 1
        store.delete_message(conversation.id, 1)
        assert [m.index for m in store.get(conversation.id).messages] == [0, 1]
        assert store.schema_version() >= 1
    finally:
        store.close()
    reopened = ConversationStore(postgres_url)  # a restart: everything is still there
    try:
        assert reopened.get(conversation.id).messages[1].text == "Come in out of the rain. Tea?"
        assert [c.id for c in reopened.list("Mira Vance")] == [conversation.id]
        reopened.delete(conversation.id)
        assert reopened.list() == []
    finally:
        reopened.close()


def test_server_stores_chat_turns_in_postgresql(postgres_url: str, start_server, tiny_engine, test_settings) -> None:
    server = start_server(tiny_engine, replace(test_settings, database_url=postgres_url))
    created = server.post("/api/v1/conversations", json={"character": "Assistant", "user_name": "Ann"})
    conversation_id = created.json()["result"]["id"]
    for text in ("one", "two"):
        reply = server.post("/api/v1/chat", json={"conversation_id": conversation_id, "user_input": text,
                                                   "max_new_tokens": 4, "temperature": 0})
        assert reply.status_code == 200, reply.text
    messages = server.get(f"/api/v1/conversations/{conversation_id}").json()["result"]["messages"]
    assert [m["role"] for m in messages] == ["character", "user", "character", "user", "character"]
    store = ConversationStore(postgres_url)
    try:
        assert len(store.get(conversation_id).messages) == 5  # really in PostgreSQL
    finally:
        store.close()
