"""No input answers 5xx: pathological bodies, text no encoder takes, samplers at their edges,
every documented field with every wrong value; and a real bug answers a generic message with
a request id instead of its exception text.

All against a real waitress server on the tiny model.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from typing import Any

import pytest

DEEP = 50_000  # brackets: far past Python's recursion limit, a few dozen kilobytes

#: One body per route family that generates, kept short (the tiny model, 2 new tokens).
GENERATE_ROUTES = {
    "/api/v1/generate": {"prompt": "Hello", "max_length": 2},
    "/api/extra/generate/stream": {"prompt": "Hello", "max_length": 2},
    "/v1/completions": {"prompt": "Hello", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2},
    "/api/v1/chat": {"user_input": "Hello", "max_new_tokens": 2},
    "/api/extra/tokencount": {"prompt": "Hello"},
}


def _errors_shape(path: str, response: Any) -> None:
    body = response.json()
    if path.startswith("/v1/"):
        assert set(body["error"]) >= {"message", "type"}, body
    else:
        assert "detail" in body, body


@pytest.mark.parametrize("path", sorted(GENERATE_ROUTES))
def test_deeply_nested_json_is_a_400_in_the_routes_shape(server: Any, path: str) -> None:
    for document in ("[" * DEEP + "]" * DEEP, '{"prompt": ' + "[" * DEEP + "]" * DEEP + "}",
                     '{"a":' * DEEP + "1" + "}" * DEEP):
        response = server.post(path, data=document, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (path, response.status_code, response.text[:200])
        _errors_shape(path, response)
        assert "nested too deeply" in response.text


@pytest.mark.parametrize("path", sorted(GENERATE_ROUTES))
def test_lone_surrogates_are_read_as_replacement_characters(server: Any, path: str) -> None:
    body = json.dumps(GENERATE_ROUTES[path]).replace("Hello", "Hel\\ud800lo \\udfff and a pair \\ud83d\\ude00")
    response = server.post(path, data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, (path, response.text[:300])
    if path == "/api/extra/tokencount":
        expected = server.post(path, json={"prompt": "Hel\ufffdlo \ufffd and a pair \U0001F600"}).json()
        assert response.json() == expected


def test_a_stored_conversation_keeps_text_that_held_a_lone_surrogate(server: Any) -> None:
    created = server.post("/api/v1/conversations", json={"character": "Assistant", "user_name": "Ann"})
    assert created.status_code == 201, created.text
    conversation_id = created.json()["result"]["id"]
    body = '{"user_input": "x\\udc00y", "conversation_id": "%s", "max_new_tokens": 2}' % conversation_id
    assert server.post("/api/v1/chat", data=body, headers={"Content-Type": "application/json"}).status_code == 200
    stored = server.get(f"/api/v1/conversations/{conversation_id}").json()["result"]
    assert any(message["text"] == "x\ufffdy" for message in stored["messages"]), stored["messages"]


def test_cards_with_lone_surrogates_or_deep_nesting_are_handled(server: Any) -> None:
    card = ('{"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": "Sur\\ud800rogate", '
            '"description": "a \\udfff b", "first_mes": "Hi"}}')
    response = server.post("/api/v1/characters", data=card.encode())
    assert response.status_code in (200, 201), response.text
    assert "Sur\ufffdrogate" in [c["name"] for c in server.get("/api/v1/characters").json()["results"]]
    assert server.get("/api/v1/characters/Sur\ufffdrogate").json()["result"]["data"]["description"] == "a \ufffd b"
    for document in ("[" * DEEP + "]" * DEEP, '{"data": ' + "[" * DEEP + "]" * DEEP + "}"):
        response = server.post("/api/v1/characters", data=document.encode(), params={"name": "deep"})
        assert 400 <= response.status_code < 500, (response.status_code, response.text[:200])
    yaml_card = ("name: Deep\ndescription: " + "[" * 5000 + "]" * 5000 + "\n").encode()
    response = server.post("/api/v1/characters", data=yaml_card, params={"name": "deep-yaml"})
    assert response.status_code < 500, response.text[:200]


#: Values no field of ours takes as they are, and some it does take in odd spellings.
HOSTILE_VALUES: list[Any] = [
    None, True, False, 0, -1, 2**70, -(2**70), 1e308, -1e308, 1e-320, 0.5, "", "x", "1e400", "NaN",
    "\ud800", [], [None], [[[]]], {}, {"a": {"b": []}}, ["\ud800"], list(range(50)), "[1, 2", "x" * 5000,
]
#: JSON literals the standard parser accepts although JSON does not.
RAW_LITERALS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "123456789012345678901234567890"]


def _documented_fields(document: dict) -> list[tuple[str, str, str]]:
    """(path, method, field) for every property of every documented JSON request body."""
    found = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            content = operation.get("requestBody", {}).get("content", {})
            schema = content.get("application/json", {}).get("schema", {})
            for name in schema.get("properties", {}):
                found.append((path, method, name))
    return found


def test_every_documented_field_with_hostile_values_never_answers_5xx(server: Any) -> None:
    """A bounded fuzz of our own document: each field of each JSON body, set alone to a
    sample of wrong values (the rest of the body valid), and as raw out-of-range literals."""
    created = server.post("/api/v1/conversations", json={"character": "Assistant", "user_name": "Ann"}).json()["result"]
    fields = _documented_fields(server.get("/api/openapi.json").json())
    assert len(fields) > 100
    rng = random.Random(20261205)
    failures = []
    for path, method, name in fields:
        concrete = path.replace("{conversation_id}", created["id"]).replace("{index}", "0").replace("{name}", "Assistant")
        if concrete.startswith("/api/latest/"):
            continue  # the same handlers as /api/v1
        base = dict(GENERATE_ROUTES.get(concrete, {}))
        if "generate" in concrete:  # Ollama's route counts its tokens in options.num_predict
            base = {"prompt": "Hi", "options": {"num_predict": 2}} if concrete == "/api/generate" else \
                {"prompt": "Hi", "max_length": 2}
        if "chat" in concrete and concrete.startswith("/api/v1/chat"):
            base = {"user_input": "Hi", "max_new_tokens": 2}
        values = rng.sample(HOSTILE_VALUES, 6)
        bodies = [json.dumps({**base, name: value}) for value in values]
        bodies += [json.dumps(base)[:-1] + (", " if base else "") + f'"{name}": {literal}}}'
                   for literal in rng.sample(RAW_LITERALS, 2)]
        for body in bodies:
            response = server.request(method, concrete, data=body, headers={"Content-Type": "application/json"})
            if response.status_code >= 500:
                failures.append((method, concrete, body[:120], response.status_code, response.text[:200]))
    assert not failures, failures[:10]


def test_whole_bodies_that_are_not_objects_never_answer_5xx(server: Any) -> None:
    document = server.get("/api/openapi.json").json()
    bodies = [b"", b"null", b"[]", b"42", b'"text"', b"\xff\xfe\x00", b"{", b'{"prompt": "\xc3\x28"}',
              b"\x00" * 64, ("[" * DEEP).encode(), b'{"prompt": "' + b"\\ud800" * 1000 + b'"}']
    failures = []
    for path, operations in document["paths"].items():
        concrete = path.replace("{conversation_id}", "nope").replace("{index}", "0").replace("{name}", "nobody")
        for method, body in itertools.product([m for m in operations if m in ("post", "put", "patch")], bodies):
            response = server.request(method, concrete, data=body, headers={"Content-Type": "application/json"})
            if response.status_code >= 500:
                failures.append((method, concrete, body[:40], response.status_code, response.text[:200]))
    assert not failures, failures[:10]


def test_a_bug_answers_a_request_id_not_its_exception_text(server: Any, caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret detail /home/someone/prompt.txt")

    services = server.app.extensions["kobold_api"]
    services.kobold.check_request = broken
    with caplog.at_level(logging.ERROR):
        kobold = server.get("/api/extra/generate/check", params={"genkey": "x"})
        services.openai.list_models = broken
        openai = server.get("/v1/models")
    for response, shape in ((kobold, "detail"), (openai, "error")):
        assert response.status_code == 500
        text = response.text
        assert "secret" not in text and "RuntimeError" not in text
        request_id = response.headers["X-Request-Id"]
        assert request_id in text and shape in response.json()
        assert any(request_id in record.getMessage() and record.exc_info for record in caplog.records)


def test_a_failed_generation_answers_a_request_id_not_its_exception_text(
        server: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from kobold_api.engine.sampling import TokenSampler

    def broken(self: Any, logits: Any, context: Any) -> int:
        raise IndexError("secret detail: index -1 is out of bounds")

    monkeypatch.setattr(TokenSampler, "__call__", broken)
    body = {"prompt": "Hello", "max_length": 3, "temperature": 1.0}
    with caplog.at_level(logging.ERROR):
        plain = server.post("/api/v1/generate", json=body)
        stream = server.post("/api/extra/generate/stream", json=body)
        chat = server.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                         "max_tokens": 3, "stream": True, "temperature": 1.0})
    assert plain.status_code == 500 and plain.json()["detail"]["type"] == "generation_error"
    assert stream.status_code == 200 and '"finish_reason": "error"' in stream.text
    assert chat.status_code == 200 and '"error"' in chat.text
    for text in (plain.text, stream.text, chat.text):
        assert "secret" not in text and "request id" in text
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert plain.json()["detail"]["request_id"] in logged and "secret detail" in logged
