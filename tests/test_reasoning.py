"""Reasoning models: the think-block budget (``reasoning_effort``, ``thinking_budget_tokens``,
Ollama's ``think``), and the reply split into ``reasoning_content`` / ``thinking`` and content,
plain and streamed, on a tiny model whose chat template opens a ``<think>`` block."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import LiveServer, make_engine
from kobold_api.api.reasoning import ReasoningSplitter, split_reasoning, template_variables
from kobold_api.chat.templates import ChatTemplateError, JinjaChatTemplate
from kobold_api.engine.engine import Engine
from kobold_api.engine.generation import GenerationRequest
from kobold_api.engine.sampling import SamplingParams
from kobold_api.engine.thinking import ThinkFormat, ThinkLimit, think_budget
from sse_client import parse_all

TAGS = ThinkFormat("<think>", "</think>", (), ())
#: ChatML whose assistant turn opens a think block, or writes an empty one when
#: ``enable_thinking`` is false (as Qwen3's template does).
THINKING_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% else %}{{ '<think>\\n' }}{% endif %}{% endif %}"
)
MESSAGES = [{"role": "user", "content": "What is the sea?"}]


# --- splitting text ------------------------------------------------------------------------------


def split_in_pieces(text: str, opened: bool, cuts: list[int], think: ThinkFormat = TAGS) -> tuple[str, str]:
    splitter = ReasoningSplitter(think, opened)
    reasoning = content = ""
    for start, end in zip([0, *cuts], [*cuts, len(text)]):
        thought, said = splitter.feed(text[start:end])
        reasoning, content = reasoning + thought, content + said
    thought, said = splitter.finish()
    return reasoning + thought, (content + said).rstrip()


@pytest.mark.parametrize("text,opened,expected", [
    ("  <think>\nI should greet.  \n\nYes.\n</think>\n\nHello there!\n", False, ("I should greet.  \n\nYes.",
                                                                                "Hello there!")),
    ("\nI ponder.\n</think>\n\nAnswer.", True, ("I ponder.", "Answer.")),
    ("I ponder forever and the reply is cut", True, ("I ponder forever and the reply is cut", "")),
    ("<think></think>Straight away.", False, ("", "Straight away.")),
])
def test_a_reply_splits_the_same_however_it_is_cut(text: str, opened: bool, expected: tuple[str, str]) -> None:
    assert split_reasoning(text, TAGS, opened) == expected
    for cut in range(1, len(text)):
        assert split_in_pieces(text, opened, [cut]) == expected, cut
    assert split_in_pieces(text, opened, list(range(1, len(text)))) == expected  # a character at a time


def test_a_reply_that_does_not_think_is_left_as_it_is() -> None:
    for text in ("Just an answer.\n", "  Spaces, then <think> later", "<thin", ""):
        assert split_reasoning(text, TAGS, False) == (None, text)
    mistral = ThinkFormat("[THINK]", "[/THINK]", (), ())
    assert split_reasoning("[THINK]hm[/THINK]Yes", mistral, False) == ("hm", "Yes")
    assert split_reasoning("<think>hm</think>Yes", mistral, False) == (None, "<think>hm</think>Yes")


def test_the_tags_come_from_the_models_template() -> None:
    encode = lambda text: [ord(char) for char in text]  # noqa: E731
    assert ThinkFormat.for_model("{{ '[THINK]' }}", encode).end == "[/THINK]"
    assert ThinkFormat.for_model(None, encode).start_ids == tuple(map(ord, "<think>"))
    assert TAGS.opened_by("...assistant\n<think>\n") and not TAGS.opened_by("<think>\n\n</think>\n\n")
    assert template_variables({"x": 1}, "none") == {"x": 1, "reasoning_effort": "none", "enable_thinking": False}
    assert template_variables({"enable_thinking": True}, "none")["enable_thinking"] is True


# --- the budget ----------------------------------------------------------------------------------


def test_efforts_are_shares_of_the_reply_and_a_budget_wins() -> None:
    assert [think_budget(effort, -1, 200) for effort in ("none", "minimal", "low", "medium", "high", "xhigh", "")] \
        == [0, 20, 50, 100, None, None, None]
    assert think_budget("low", 7, 200) == 7 and think_budget("", 0, 200) == 0


def test_the_closing_tag_is_forced_once_the_budget_is_spent() -> None:
    think = ThinkFormat("<think>", "</think>", (1, 2), (3, 4, 5))
    limit = ThinkLimit(think, 3, opened=True)
    assert [limit.forced_token([9] * n) for n in range(3)] == [None, None, None]
    assert limit.forced_token([9, 9, 9]) == 3
    assert limit.forced_token([9, 9, 9, 3]) == 4 and limit.forced_token([9, 9, 9, 3, 4]) == 5
    assert limit.forced_token([9, 9, 9, 3, 4, 5]) is None and limit.forced_token([9, 9, 9, 3, 4, 5, 9, 9]) is None
    assert limit.forced_token([9, 9, 9, 3]) == 4  # the tag was taken back (a phrase ban): forced again
    # A reply that opens its own block counts from there; one that never opens it is left alone.
    limit = ThinkLimit(think, 2, opened=False)
    assert limit.forced_token([8, 1, 2, 9]) is None and limit.forced_token([8, 1, 2, 9, 9]) == 3
    assert ThinkLimit(think, 0, opened=False).forced_token([7, 7, 7, 7, 1, 2]) is None
    # The model's own closing tag under way is finished, not restarted.
    assert ThinkLimit(think, 2, opened=True).forced_token([9, 9, 3]) == 4


def generate(engine: Engine, prompt: str, **sampling: Any) -> list[int]:
    request = GenerationRequest(prompt=prompt, max_new_tokens=24, ban_eos=True, logprobs=0,
                                sampling=SamplingParams(temperature=0.0, rep_pen=1.0, **sampling))
    return [entry.token_id for entry in engine.generator.generate(request).token_logprobs]


def test_the_engine_closes_an_opened_block_on_budget(tiny_engine: Engine) -> None:
    end = list(tiny_engine.generator.think.end_ids)
    opened = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    free = generate(tiny_engine, opened)
    assert tiny_engine.tokenizer.decode(free).find("</think>") < 0  # the random model never closes it
    bounded = generate(tiny_engine, opened, thinking_budget_tokens=5)
    assert bounded[:5] == free[:5] and bounded[5:5 + len(end)] == end
    assert generate(tiny_engine, opened, reasoning_effort="none")[:len(end)] == end
    assert generate(tiny_engine, opened, reasoning_effort="high") == free
    # Without an opened block (and none opened by the reply) the budget changes nothing.
    closed = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert generate(tiny_engine, closed, thinking_budget_tokens=0) == generate(tiny_engine, closed)


# --- the routes ----------------------------------------------------------------------------------


@pytest.fixture
def thinking_server(start_server: Callable[..., LiveServer], tiny_model_dir: Path, test_settings: Any):
    engine = make_engine(tiny_model_dir)
    engine.tokenizer.chat_template = THINKING_TEMPLATE
    yield start_server(engine, replace(test_settings, context_size=4096))
    engine.shutdown()


def test_openai_chat_returns_the_thoughts_as_reasoning_content(thinking_server: LiveServer) -> None:
    body = {"messages": MESSAGES, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
            "thinking_budget_tokens": 6}
    answer = thinking_server.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    message = answer.json()["choices"][0]["message"]
    reasoning, content = message["reasoning_content"], message["content"]
    assert reasoning and len(reasoning) <= 6 and content  # byte-level tokens: at most 6 characters
    assert "think>" not in reasoning + content
    # The same reply, raw: the thoughts, the forced closing tag, then the answer.
    raw = thinking_server.post("/api/v1/generate", json={
        "prompt": "<|im_start|>user\nWhat is the sea?<|im_end|>\n<|im_start|>assistant\n<think>\n",
        "max_length": 24, "temperature": 0, "ban_eos_token": True, "thinking_budget_tokens": 6,
        "stop_sequence": ["<|im_end|>", "<|im_start|>"]}).json()["results"][0]["text"]
    assert split_reasoning(raw, TAGS, True) == (reasoning, content)

    streamed = thinking_server.post("/v1/chat/completions", json={**body, "stream": True}, stream=True)
    events, _ = parse_all(streamed.iter_content(chunk_size=None))
    deltas = [event.json()["choices"][0]["delta"] for event in events[:-1] if event.json()["choices"]]
    assert "".join(delta.get("reasoning_content", "") for delta in deltas) == reasoning
    assert "".join(delta.get("content") or "" for delta in deltas).rstrip() == content
    first_answer = next(i for i, delta in enumerate(deltas) if delta.get("content"))
    assert not any(delta.get("reasoning_content") for delta in deltas[first_answer + 1:])  # thoughts first


@pytest.mark.parametrize("switch", [{"reasoning_effort": "none"}, {"chat_template_kwargs": {"enable_thinking": False}}])
def test_thinking_switched_off_through_the_template(thinking_server: LiveServer, switch: dict[str, Any]) -> None:
    answer = thinking_server.post("/v1/chat/completions", json={
        "messages": MESSAGES, "max_tokens": 12, "temperature": 0, "ignore_eos": True, **switch})
    message = answer.json()["choices"][0]["message"]
    assert "reasoning_content" not in message and message["content"]


def test_a_bad_effort_is_refused(thinking_server: LiveServer) -> None:
    refused = thinking_server.post("/v1/chat/completions", json={"messages": MESSAGES, "reasoning_effort": "lots"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "reasoning_effort"
    kobold = thinking_server.post("/api/v1/generate", json={"prompt": "Hi", "thinking_budget_tokens": -2})
    assert kobold.status_code == 422 and "thinking_budget_tokens" in kobold.json()["detail"]


def test_ollama_chat_returns_thinking(thinking_server: LiveServer) -> None:
    body = {"messages": MESSAGES, "think": "low", "stream": False,
            "options": {"num_predict": 24, "temperature": 0, "ignore_eos": True}}
    answer = thinking_server.post("/api/chat", json=body)
    assert answer.status_code == 200, answer.text
    message = answer.json()["message"]
    assert message["thinking"] and len(message["thinking"]) <= 6 and message["content"]  # 25% of 24 tokens
    lines = thinking_server.post("/api/chat", json={**body, "stream": True}).text.strip().splitlines()
    parts = [json.loads(line)["message"] for line in lines]
    assert "".join(part.get("thinking", "") for part in parts) == message["thinking"]
    assert "".join(part["content"] for part in parts).rstrip() == message["content"]
    off = thinking_server.post("/api/chat", json={**body, "think": False}).json()["message"]
    assert "thinking" not in off and off["content"]


def test_server_side_chat_keeps_thoughts_out_of_the_stored_reply(thinking_server: LiveServer) -> None:
    created = thinking_server.post("/api/v1/conversations", json={"character": "Mira Vance"})
    assert created.status_code == 201, created.text
    conversation_id = created.json()["result"]["id"]
    body = {"conversation_id": conversation_id, "user_input": "What is the sea?", "mode": "instruct",
            "max_new_tokens": 24, "temperature": 0, "ban_eos_token": True, "thinking_budget_tokens": 5}
    turn = thinking_server.post("/api/v1/chat", json=body)
    assert turn.status_code == 200, turn.text
    result = turn.json()["results"][0]
    assert result["reasoning"] and len(result["reasoning"]) <= 5 and result["text"]
    assert "think>" not in result["text"]
    stored = thinking_server.get(f"/api/v1/conversations/{conversation_id}").json()["result"]["messages"]
    assert stored[-1]["text"] == result["text"]

    # Streamed (a swipe of the same reply): the tokens sent add up to the stored text, no thoughts.
    streamed = thinking_server.post("/api/v1/chat/stream", json={**body, "regenerate": True}, stream=True)
    events, _ = parse_all(streamed.iter_content(chunk_size=None))
    payloads = [event.json() for event in events]
    last = payloads[-1]["results"][0]
    assert "".join(p["token"] for p in payloads[:-1]) == last["text"] == result["text"]
    assert last["reasoning"] == result["reasoning"]


def test_openai_chat_with_a_character_returns_the_thoughts_apart(thinking_server: LiveServer) -> None:
    body = {"messages": MESSAGES, "character": "Mira Vance", "mode": "instruct", "max_tokens": 24,
            "temperature": 0, "ignore_eos": True, "thinking_budget_tokens": 5}
    message = thinking_server.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert message["reasoning_content"] and message["content"] and "think>" not in message["content"]
    streamed = thinking_server.post("/v1/chat/completions", json={**body, "stream": True}, stream=True)
    events, _ = parse_all(streamed.iter_content(chunk_size=None))
    deltas = [event.json()["choices"][0]["delta"] for event in events[:-1]]
    assert "".join(delta.get("content", "") for delta in deltas) == message["content"]
    assert [delta["reasoning_content"] for delta in deltas if "reasoning_content" in delta] \
        == [message["reasoning_content"]]


def test_template_variables_cannot_break_the_server(thinking_server: LiveServer) -> None:
    for kwargs in ({"raise_exception": 1, "messages": "x", "enable_thinking": False}, {"enable_thinking": [1, 2]}):
        answer = thinking_server.post("/v1/chat/completions", json={
            "messages": MESSAGES, "max_tokens": 4, "chat_template_kwargs": kwargs})
        assert answer.status_code == 200, answer.text


def test_a_variable_a_template_cannot_use_is_a_template_error() -> None:
    template = JinjaChatTemplate("{{ messages[0]['content'] }}{% if count is defined %}{{ count + 1 }}{% endif %}")
    assert template.render(MESSAGES, True, variables={"count": 2}) == "What is the sea?3"
    with pytest.raises(ChatTemplateError, match="variables sent"):
        template.render(MESSAGES, True, variables={"count": "two"})
