"""``Idempotency-Key`` on /api/v1/chat and /api/v1/chat/stream, against a real server.

A client that lost an answer (a timeout, a dropped connection, a replica that died) sends the
turn again with the same key: a finished turn is answered from the store, never stored twice.
"""

from __future__ import annotations

import json
from typing import Any

from conftest import LiveServer


def _conversation(server: LiveServer) -> str:
    return server.post("/api/v1/conversations", json={"character": "Assistant"}).json()["result"]["id"]


def _events(response: Any) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in response.text.splitlines()
            if line.startswith("data:") and line[5:].strip() != "[DONE]"]


def test_a_retried_turn_is_answered_from_the_store(server: LiveServer) -> None:
    conversation_id = _conversation(server)
    body = {"conversation_id": conversation_id, "user_input": "Hello", "max_new_tokens": 5}
    first = server.post("/api/v1/chat", json=body, headers={"Idempotency-Key": "turn-1"})
    assert first.status_code == 200, first.text
    result = first.json()["results"][0]
    assert "idempotent_replay" not in result
    again = server.post("/api/v1/chat", json=body, headers={"Idempotency-Key": "turn-1"})
    replayed = again.json()["results"][0]
    assert replayed["idempotent_replay"] is True
    for field in ("text", "finish_reason", "prompt_tokens", "completion_tokens", "conversation_id", "history"):
        assert replayed[field] == result[field], field
    streamed = server.post("/api/v1/chat/stream", json=body, headers={"Idempotency-Key": "turn-1"})
    events = _events(streamed)
    assert "".join(e["token"] for e in events) == result["text"]
    assert events[-1]["results"][0]["idempotent_replay"] is True
    messages = server.get(f"/api/v1/conversations/{conversation_id}").json()["result"]["messages"]
    assert [m["text"] for m in messages if m["role"] == "user"] == ["Hello"]

    # A new key is a new turn; a streamed turn is kept under its key the same way.
    stream_body = {**body, "user_input": "And again"}
    live = _events(server.post("/api/v1/chat/stream", json=stream_body, headers={"Idempotency-Key": "turn-2"}))
    retry = _events(server.post("/api/v1/chat/stream", json=stream_body, headers={"Idempotency-Key": "turn-2"}))
    assert "".join(e["token"] for e in retry) == "".join(e["token"] for e in live)
    assert "idempotent_replay" not in live[-1]["results"][0]
    messages = server.get(f"/api/v1/conversations/{conversation_id}").json()["result"]["messages"]
    assert [m["text"] for m in messages if m["role"] == "user"] == ["Hello", "And again"]


def test_a_key_reused_for_another_request_is_refused(server: LiveServer) -> None:
    conversation_id = _conversation(server)
    body = {"conversation_id": conversation_id, "user_input": "Hello", "max_new_tokens": 3}
    assert server.post("/api/v1/chat", json=body, headers={"Idempotency-Key": "k"}).status_code == 200
    other = server.post("/api/v1/chat", json={**body, "user_input": "Bye"}, headers={"Idempotency-Key": "k"})
    assert other.status_code == 422
    assert other.json()["detail"]["type"] == "idempotency_key_reused"
    too_long = server.post("/api/v1/chat", json=body, headers={"Idempotency-Key": "x" * 256})
    assert too_long.status_code == 400
    assert "Idempotency-Key" in too_long.json()["detail"]["msg"]
    messages = server.get(f"/api/v1/conversations/{conversation_id}").json()["result"]["messages"]
    assert [m["text"] for m in messages if m["role"] == "user"] == ["Hello"]  # one turn stored


def test_a_stateless_chat_ignores_the_key(server: LiveServer) -> None:
    body = {"user_input": "Hello", "max_new_tokens": 3, "history": {"internal": [], "visible": []}}
    for _ in range(2):
        answer = server.post("/api/v1/chat", json=body, headers={"Idempotency-Key": "same"})
        assert answer.status_code == 200
        assert "idempotent_replay" not in answer.json()["results"][0]


def test_openai_chat_with_a_conversation_takes_the_key_too(server: LiveServer) -> None:
    conversation_id = _conversation(server)
    body = {"model": "x", "conversation_id": conversation_id, "max_tokens": 5,
            "messages": [{"role": "user", "content": "Hello there"}]}
    first = server.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": "oa-1"})
    assert first.status_code == 200, first.text
    again = server.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": "oa-1"})
    assert again.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    assert again.json()["usage"] == first.json()["usage"]
    streamed = server.post("/v1/chat/completions", json={**body, "stream": True}, headers={"Idempotency-Key": "oa-1"})
    assert streamed.status_code == 400  # another body under the same key (OpenAI reports 422s as 400)
    assert "already used for another request" in streamed.json()["error"]["message"]
    stream_body = {**body, "stream": True, "messages": [{"role": "user", "content": "Streamed"}]}
    texts = []
    for _ in range(2):
        chunks = _events(server.post("/v1/chat/completions", json=stream_body, headers={"Idempotency-Key": "oa-2"}))
        texts.append("".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")))
    assert texts[0] == texts[1] != ""
    messages = server.get(f"/api/v1/conversations/{conversation_id}").json()["result"]["messages"]
    assert [m["text"] for m in messages if m["role"] == "user"] == ["Hello there", "Streamed"]
    bad = server.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": "é"})
    assert bad.status_code == 400 and "error" in bad.json()  # OpenAI's error shape
