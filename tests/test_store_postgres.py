"""The conversation store on PostgreSQL: any SQLAlchemy URL works, not only the SQLite default.

The ``postgres_url`` fixture (conftest.py) starts a throwaway PostgreSQL cluster for the session
when this machine has the server binaries; otherwise the tests are skipped and say why.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from kobold_api.chat.conversations import ConversationStore

pytest.importorskip("psycopg2", reason="psycopg2 is not installed")


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
