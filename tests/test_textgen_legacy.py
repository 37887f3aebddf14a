"""text-generation-webui's legacy API, as its example clients use it: websocket streaming (a
real websocket client against the server's websocket port), /api/v1/token-count,
/api/v1/stop-stream, and its example request bodies replayed unchanged.
"""

from __future__ import annotations

import html
import json
import threading
import time
from dataclasses import replace
from typing import Any, Iterator

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from kobold_api.api.textgen.websocket import WebSocketServer

#: The body of text-generation-webui's example stream client (api-example-stream.py), with a
#: shorter reply so the tiny model finishes quickly.
EXAMPLE_GENERATE = {
    "prompt": "In order to make homemade bread, follow these steps:\n1)", "max_new_tokens": 24,
    "auto_max_new_tokens": False, "max_tokens_second": 0, "preset": "None", "do_sample": True,
    "temperature": 0.7, "top_p": 0.1, "typical_p": 1, "epsilon_cutoff": 0, "eta_cutoff": 0, "tfs": 1,
    "top_a": 0, "repetition_penalty": 1.18, "repetition_penalty_range": 0, "top_k": 40, "min_length": 0,
    "no_repeat_ngram_size": 0, "num_beams": 1, "penalty_alpha": 0, "length_penalty": 1, "early_stopping": False,
    "mirostat_mode": 0, "mirostat_tau": 5, "mirostat_eta": 0.1, "guidance_scale": 1, "negative_prompt": "",
    "seed": -1, "add_bos_token": True, "truncation_length": 2048, "ban_eos_token": False,
    "skip_special_tokens": True, "stopping_strings": [],
}
#: Its example chat client's body (api-example-chat.py / -chat-stream.py), newer field spellings.
EXAMPLE_CHAT = {
    "user_input": "Please give me a step-by-step guide on how to plant a tree in my backyard.",
    "max_new_tokens": 24, "auto_max_new_tokens": False, "max_tokens_second": 0,
    "history": {"internal": [], "visible": []}, "mode": "instruct", "character": "Example",
    "instruction_template": "Vicuna-v1.1", "your_name": "You", "regenerate": False, "_continue": False,
    "chat_instruct_command": 'Continue the chat dialogue below. Write a single reply for the character '
                             '"<|character|>".\n\n<|prompt|>',
    "preset": "None", "do_sample": True, "temperature": 0.7, "top_p": 0.1, "typical_p": 1, "epsilon_cutoff": 0,
    "eta_cutoff": 0, "tfs": 1, "top_a": 0, "repetition_penalty": 1.18, "repetition_penalty_range": 0,
    "top_k": 40, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1, "penalty_alpha": 0,
    "length_penalty": 1, "early_stopping": False, "mirostat_mode": 0, "mirostat_tau": 5, "mirostat_eta": 0.1,
    "guidance_scale": 1, "negative_prompt": "", "seed": -1, "add_bos_token": True, "truncation_length": 2048,
    "ban_eos_token": False, "skip_special_tokens": True, "stopping_strings": [],
}
#: The older generation of the same client: other spellings, fields since removed.
OLD_EXAMPLE_CHAT = {
    "user_input": "Hello there", "history": {"internal": [], "visible": []}, "mode": "chat-instruct",
    "character": "Example", "instruction_template": "Llama-v2", "your_name": "You", "regenerate": False,
    "_continue": False, "stop_at_newline": False, "chat_prompt_size": 2048, "chat_generation_attempts": 1,
    "chat-instruct_command": 'Continue the chat dialogue below. Write a single reply for the character '
                             '"<|character|>".\n\n<|prompt|>',
    "max_new_tokens": 16, "do_sample": True, "temperature": 0.7, "top_p": 0.1, "typical_p": 1,
    "repetition_penalty": 1.18, "top_k": 40, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
    "penalty_alpha": 0, "length_penalty": 1, "early_stopping": False, "seed": -1, "add_bos_token": True,
    "truncation_length": 2048, "ban_eos_token": False, "skip_special_tokens": True, "stopping_strings": [],
}


@pytest.fixture
def ws(server: Any) -> Iterator[str]:
    """The websocket server of ``server``'s app on a free port; yields its ws:// base URL."""
    websockets = WebSocketServer(server.app, "127.0.0.1", 0)
    yield f"ws://127.0.0.1:{websockets.port}"
    websockets.close()


def stream(url: str, body: dict[str, Any], **headers: str) -> list[dict[str, Any]]:
    with connect(url, additional_headers=headers or None, open_timeout=10) as websocket:
        websocket.send(json.dumps(body))
        return [json.loads(message) for message in websocket]


def test_stream_sends_text_events_then_stream_end(server: Any, ws: str) -> None:
    greedy = {**EXAMPLE_GENERATE, "do_sample": False}  # text-generation-webui's way to ask for greedy
    events = stream(f"{ws}/api/v1/stream", greedy)
    assert [e["event"] for e in events] == ["text_stream"] * (len(events) - 1) + ["stream_end"]
    assert [e["message_num"] for e in events] == list(range(len(events)))
    streamed = "".join(e["text"] for e in events[:-1])
    blocking = server.post("/api/v1/generate", json=greedy).json()["results"][0]["text"]
    assert streamed == blocking and streamed


def test_the_example_stream_body_is_accepted_unchanged(ws: str) -> None:
    events = stream(f"{ws}/api/v1/stream", EXAMPLE_GENERATE)
    assert events[-1]["event"] == "stream_end" and len(events) > 1


def test_chat_stream_sends_the_growing_history(server: Any, ws: str) -> None:
    events = stream(f"{ws}/api/v1/chat-stream", EXAMPLE_CHAT)
    assert events[-1] == {"event": "stream_end", "message_num": len(events) - 1}
    replies = [e["history"]["visible"][-1][1] for e in events[:-1]]
    assert replies and all(later.startswith(earlier) for earlier, later in zip(replies, replies[1:]))
    last = events[-2]["history"]
    assert last["internal"][-1][0] == EXAMPLE_CHAT["user_input"]
    # What the example stream client prints equals what the blocking route returns for that history.
    final = server.post("/api/v1/chat", json={**EXAMPLE_CHAT, "seed": 5, "temperature": 0}).json()
    assert html.unescape(final["results"][0]["history"]["visible"][-1][1])


@pytest.mark.parametrize("body", [EXAMPLE_CHAT, OLD_EXAMPLE_CHAT], ids=["new", "old"])
def test_example_chat_bodies_replayed_unchanged(server: Any, body: dict[str, Any]) -> None:
    response = server.post("/api/v1/chat", json=body)
    assert response.status_code == 200, response.text
    history = response.json()["results"][0]["history"]
    assert history["visible"][-1][0] == body["user_input"]
    assert isinstance(history["visible"][-1][1], str)


def test_chat_stream_regenerate_and_continue_show_the_right_rows(ws: str) -> None:
    rows = [["Hi", "Hello."], ["How are you?", "Fine"]]
    history = {"internal": rows, "visible": rows}
    base = {**EXAMPLE_CHAT, "history": history, "user_input": "", "max_new_tokens": 8, "ban_eos_token": True}
    regenerated = stream(f"{ws}/api/v1/chat-stream", {**base, "regenerate": True})[-2]["history"]["internal"]
    assert regenerated[:-1] == rows[:1] and regenerated[-1][0] == "How are you?"
    continued = stream(f"{ws}/api/v1/chat-stream", {**base, "_continue": True})[-2]["history"]["internal"]
    assert continued[:-1] == rows[:1] and continued[-1][1].startswith("Fine") and continued[-1][1] != "Fine"


def test_bad_requests_get_an_error_event_in_the_kobold_shape(ws: str) -> None:
    events = stream(f"{ws}/api/v1/stream", {"prompt": "x", "max_new_tokens": "many"})
    assert len(events) == 1 and events[0]["event"] == "error" and events[0]["status"] == 422
    assert "max_new_tokens" in events[0]["detail"]
    events = stream(f"{ws}/api/v1/chat-stream", {**EXAMPLE_CHAT, "character": "Nobody Here"})
    assert events[0]["event"] == "error" and events[0]["status"] == 404
    with connect(f"{ws}/api/v1/stream") as websocket:
        websocket.send("{not json")
        assert json.loads(websocket.recv())["status"] == 400


def test_unknown_paths_and_missing_keys_are_refused_at_the_handshake(start_server: Any, tiny_engine: Any,
                                                                      test_settings: Any) -> None:
    server = start_server(tiny_engine, replace(test_settings, api_key="sesame"))
    websockets = WebSocketServer(server.app, "127.0.0.1", 0)
    try:
        base = f"ws://127.0.0.1:{websockets.port}"
        with pytest.raises(InvalidStatus) as refused:
            stream(f"{base}/api/v1/elsewhere", EXAMPLE_GENERATE)
        assert refused.value.response.status_code == 404
        with pytest.raises(InvalidStatus) as refused:
            stream(f"{base}/api/v1/stream", EXAMPLE_GENERATE)
        assert refused.value.response.status_code == 401
        events = stream(f"{base}/api/v1/stream", {**EXAMPLE_GENERATE, "max_new_tokens": 2},
                        Authorization="Bearer sesame")
        assert events[-1]["event"] == "stream_end"
    finally:
        websockets.close()


def test_token_count(server: Any) -> None:
    text = "Hello there, tree planter."
    counted = server.post("/api/v1/token-count", json={"prompt": text}).json()
    assert counted == {"results": [{"tokens": server.post("/api/extra/tokencount", json={"prompt": text}).json()["value"]}]}
    assert counted["results"][0]["tokens"] > 0
    assert server.post("/api/v1/token-count", json={"prompt": 5}).status_code == 422


def test_stop_stream_ends_the_callers_websocket_stream(server: Any, ws: str) -> None:
    events: list[dict[str, Any]] = []
    body = {"prompt": "Count:", "max_new_tokens": 4000, "ban_eos_token": True, "truncation_length": 8192}

    def run() -> None:
        events.extend(stream(f"{ws}/api/v1/stream", body))

    reader = threading.Thread(target=run)
    reader.start()
    deadline = time.monotonic() + 30
    while not server.app.extensions["kobold_api"].engine.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.post("/api/v1/stop-stream").json() == {"results": "success"}
    reader.join(timeout=30)
    assert not reader.is_alive()
    assert events[-1]["event"] == "stream_end"
    assert len(events) - 1 < 4000
