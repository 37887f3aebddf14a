"""The OpenAI-compatible routes (/v1/models, /v1/completions, /v1/chat/completions) driven
by the official ``openai`` client against a real waitress server on the tiny model.

The tiny model emits random bytes, so every assertion is about structure, counts and
determinism (greedy ``temperature=0`` or a fixed ``seed``), never about meaning.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import openai
import pytest
import requests

PROMPT = "Hello world"
CHAT_MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Tell me more"},
]
ERROR_KEYS = {"message", "type", "param", "code"}


# --- helpers ----------------------------------------------------------------------------


def client_for(server: Any, api_key: str = "x") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=60)


@pytest.fixture
def client(server: Any) -> Iterator[openai.OpenAI]:
    # Closed before the server, so no idle keep-alive connection delays its shutdown.
    with client_for(server) as api:
        yield api


@pytest.fixture
def model_id(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def token_count(server: Any, text: str) -> int:
    response = server.post("/api/extra/tokencount", json={"prompt": text})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["value"] == len(body["ids"])
    return body["value"]


def render_chatml(messages: list[dict[str, str]]) -> str:
    """The tiny model's ChatML chat template with add_generation_prompt."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + "<|im_start|>assistant\n"


def pick_stop(text: str, length: int = 3) -> tuple[str, int]:
    """A substring of ``text`` (>= 2 tokens, no U+FFFD) whose first occurrence is not at 0."""
    for start in range(2, len(text) - length):
        candidate = text[start:start + length]
        if "\ufffd" not in candidate and text.find(candidate) == start:
            return candidate, start
    raise AssertionError(f"no usable stop string in {text!r}")


def assert_openai_error(response: requests.Response, status: int, param: str | None = None,
                        code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def sse_data_lines(response: requests.Response) -> list[str]:
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    raw = response.content.decode("utf-8")
    return [line[len("data: "):] for line in raw.split("\n") if line.startswith("data: ")]


# --- models -----------------------------------------------------------------------------


def test_models_list(client: openai.OpenAI, server: Any) -> None:
    page = client.models.list()
    ids = [model.id for model in page.data]
    assert ids and all(isinstance(i, str) and i for i in ids)
    assert all(model.object == "model" for model in page.data)
    assert server.get("/v1/models").json()["object"] == "list"
    # The first id (what SillyTavern uses) is accepted as `model`.
    completion = client.completions.create(model=ids[0], prompt=PROMPT, max_tokens=2, temperature=0)
    assert completion.model == ids[0]
    chat = client.chat.completions.create(model=ids[0], messages=CHAT_MESSAGES[1:2], max_tokens=2,
                                          temperature=0)
    assert chat.model == ids[0]


def test_any_model_name_is_served_by_the_loaded_model(client: openai.OpenAI, server: Any, model_id: str) -> None:
    """KoboldCpp serves whatever `model` a client names (many have one hard-coded)."""
    completion = client.completions.create(model="gpt-3.5-turbo", prompt=PROMPT, max_tokens=2, temperature=0)
    assert completion.model == model_id and completion.usage.completion_tokens == 2
    chat = client.chat.completions.create(model="no-such-model", messages=CHAT_MESSAGES, max_tokens=2,
                                          temperature=0)
    assert chat.model == model_id
    chunks = list(client.chat.completions.create(model="no-such-model", messages=CHAT_MESSAGES, max_tokens=2,
                                                 stream=True))
    assert chunks and all(chunk.model == model_id for chunk in chunks)


# --- completions ------------------------------------------------------------------------


def test_completion_string_prompt(client: openai.OpenAI, model_id: str, server: Any) -> None:
    result = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=7, temperature=0)
    assert result.object == "text_completion"
    assert result.id.startswith("cmpl-")
    assert len(result.choices) == 1
    choice = result.choices[0]
    assert choice.index == 0
    assert choice.finish_reason == "length"
    assert isinstance(choice.text, str) and choice.text
    assert result.usage.completion_tokens == 7
    assert result.usage.prompt_tokens == token_count(server, PROMPT)
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_completion_list_prompt(client: openai.OpenAI, model_id: str, server: Any) -> None:
    prompts = [PROMPT, "Once upon a time", "abc"]
    result = client.completions.create(model=model_id, prompt=prompts, max_tokens=5, temperature=0)
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in result.choices)
    assert result.usage.completion_tokens == 5 * len(prompts)
    assert result.usage.prompt_tokens == sum(token_count(server, p) for p in prompts)
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    # Each choice answers its own prompt: same text as asking for that prompt alone.
    for prompt, choice in zip(prompts, result.choices):
        alone = client.completions.create(model=model_id, prompt=prompt, max_tokens=5, temperature=0)
        assert choice.text == alone.choices[0].text, prompt


def test_completion_echo(client: openai.OpenAI, model_id: str, server: Any) -> None:
    plain = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=4, temperature=0)
    echoed = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    assert echoed.usage.prompt_tokens == token_count(server, PROMPT)
    assert echoed.usage.completion_tokens == 4


def test_completion_n2(client: openai.OpenAI, model_id: str, server: Any) -> None:
    result = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=11, n=2)
    assert [c.index for c in result.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in result.choices)
    # Two samples, not one sample twice.
    assert result.choices[0].text != result.choices[1].text
    assert result.usage.completion_tokens == 12
    # The prompt is counted once, as OpenAI does.
    assert result.usage.prompt_tokens == token_count(server, PROMPT)
    again = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=11, n=2)
    assert [c.text for c in again.choices] == [c.text for c in result.choices]
    # n with a prompt list: n choices per prompt, indexes counting through all of them.
    both = client.completions.create(model=model_id, prompt=[PROMPT, "abc"], max_tokens=3, temperature=0, n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert both.usage.completion_tokens == 12


def test_completion_stop(client: openai.OpenAI, model_id: str) -> None:
    full = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=24, temperature=0)
    text = full.choices[0].text
    stop, position = pick_stop(text)
    # As a single string.
    single = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop)
    assert single.choices[0].text == text[:position]
    assert single.choices[0].finish_reason == "stop"
    assert single.usage.completion_tokens < 24
    # As a list, with a stop string that never occurs first.
    listed = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=24, temperature=0,
                                       stop=["\u2603never\u2603", stop])
    assert listed.choices[0].text == text[:position]
    assert listed.choices[0].finish_reason == "stop"
    # A stop string that never occurs changes nothing.
    untouched = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=24, temperature=0,
                                          stop=["\u2603never\u2603"])
    assert untouched.choices[0].text == text
    assert untouched.choices[0].finish_reason == "length"


def test_completion_seed(client: openai.OpenAI, model_id: str) -> None:
    def sample(seed: int) -> str:
        result = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=seed)
        return result.choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first
    assert sample(99) != first


def test_completion_penalties(client: openai.OpenAI, model_id: str) -> None:
    base = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=16, temperature=0)
    # The tiny model's greedy text repeats itself, so a strong penalty must change it.
    assert len(set(base.choices[0].text)) < len(base.choices[0].text)
    for key in ("presence_penalty", "frequency_penalty"):
        penalised = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=16, temperature=0,
                                              **{key: 2.0})
        assert penalised.choices[0].finish_reason in ("length", "stop")
        assert penalised.choices[0].text != base.choices[0].text, key
        with pytest.raises(openai.BadRequestError):  # outside OpenAI's -2..2
            client.completions.create(model=model_id, prompt=PROMPT, max_tokens=2, **{key: 3.0})


def test_completion_kobold_keys(client: openai.OpenAI, model_id: str) -> None:
    greedy = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=12, temperature=0)
    # top_k=1 makes sampling at temperature 1 greedy, whatever the seed.
    for seed in (1, 2):
        top1 = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=seed,
                                         extra_body={"top_k": 1})
        assert top1.choices[0].text == greedy.choices[0].text
    penalised = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=12, temperature=0,
                                          extra_body={"rep_pen": 3.0, "rep_pen_range": 64})
    assert penalised.choices[0].text != greedy.choices[0].text
    # Kobold's own length key works when max_tokens is absent.
    kobold_len = client.completions.create(model=model_id, prompt=PROMPT, temperature=0,
                                           extra_body={"max_length": 3})
    assert kobold_len.usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model_id, prompt=PROMPT, max_tokens=2, extra_body={"top_k": "many"})


# --- chat completions -------------------------------------------------------------------


def test_chat_completion(client: openai.OpenAI, model_id: str, server: Any) -> None:
    result = client.chat.completions.create(model=model_id, messages=CHAT_MESSAGES, max_tokens=9, temperature=0)
    assert result.object == "chat.completion"
    assert result.id.startswith("chatcmpl-")
    assert len(result.choices) == 1
    choice = result.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    assert result.usage.completion_tokens == 9
    assert result.usage.prompt_tokens == token_count(server, render_chatml(CHAT_MESSAGES))
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    # max_completion_tokens is the newer name of max_tokens.
    newer = client.chat.completions.create(model=model_id, messages=CHAT_MESSAGES, max_completion_tokens=4,
                                           temperature=0)
    assert newer.usage.completion_tokens == 4
    assert newer.choices[0].message.content == choice.message.content[:len(newer.choices[0].message.content)]


def test_chat_messages_forms_and_n(client: openai.OpenAI, model_id: str, server: Any) -> None:
    expected = token_count(server, render_chatml(CHAT_MESSAGES))
    # Content given as text parts, and the "developer" role, are the same prompt.
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in CHAT_MESSAGES]
    as_parts = client.chat.completions.create(model=model_id, messages=parts, max_tokens=3, temperature=0)
    assert as_parts.usage.prompt_tokens == expected
    developer = [{"role": "developer", "content": CHAT_MESSAGES[0]["content"]}, *CHAT_MESSAGES[1:]]
    as_developer = client.chat.completions.create(model=model_id, messages=developer, max_tokens=3, temperature=0)
    assert as_developer.usage.prompt_tokens == expected
    # n=2: two samples with their own indexes, the prompt counted once.
    two = client.chat.completions.create(model=model_id, messages=CHAT_MESSAGES, max_tokens=6, temperature=1.0,
                                         seed=3, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert all(c.message.role == "assistant" and c.finish_reason == "length" for c in two.choices)
    assert two.choices[0].message.content != two.choices[1].message.content
    assert two.usage.prompt_tokens == expected
    assert two.usage.completion_tokens == 12


def test_chat_completion_stop(client: openai.OpenAI, model_id: str) -> None:
    full = client.chat.completions.create(model=model_id, messages=CHAT_MESSAGES, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    stop, position = pick_stop(text)
    for value in (stop, [stop], ["\u2603never\u2603", stop]):
        result = client.chat.completions.create(model=model_id, messages=CHAT_MESSAGES, max_tokens=24,
                                                temperature=0, stop=value)
        assert result.choices[0].message.content == text[:position], value
        assert result.choices[0].finish_reason == "stop"


def test_chat_response_format(client: openai.OpenAI, model_id: str, server: Any) -> None:
    ok = client.chat.completions.create(model=model_id, messages=CHAT_MESSAGES, max_tokens=2, temperature=0,
                                        response_format={"type": "text"})
    assert ok.choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_id, messages=CHAT_MESSAGES, max_tokens=2,
                                       response_format={"type": "xml"})  # type: ignore[arg-type]
    assert info.value.status_code == 400
    for fmt in ({"type": "xml"}, {"type": "json_schema", "json_schema": {"schema": {"type": "wat"}}},
                {"type": "json_schema", "json_schema": "nope"}):
        response = server.post("/v1/chat/completions", json={"model": model_id, "messages": CHAT_MESSAGES,
                                                             "max_tokens": 2, "response_format": fmt})
        assert_openai_error(response, 400, param="response_format")


# --- streaming --------------------------------------------------------------------------


def test_completion_stream_matches_non_stream(client: openai.OpenAI, model_id: str) -> None:
    kwargs = dict(model=model_id, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=77)
    plain = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks
    content = [c for c in chunks if c.choices]
    assert all(c.object == "text_completion" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert "".join(ch.text for c in content for ch in c.choices) == plain.choices[0].text
    assert content[-1].choices[0].finish_reason == plain.choices[0].finish_reason == "length"
    assert all(ch.finish_reason is None for c in content[:-1] for ch in c.choices)
    # The usage chunk comes last, with no choices and the same usage as the plain request.
    assert not chunks[-1].choices
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    # Without include_usage no chunk carries usage.
    no_usage = list(client.completions.create(**kwargs, stream=True))
    assert all(c.choices and c.usage is None for c in no_usage)
    assert "".join(ch.text for c in no_usage for ch in c.choices) == plain.choices[0].text


def test_completion_stream_stop_and_n(client: openai.OpenAI, model_id: str) -> None:
    full = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=24, temperature=0)
    stop, position = pick_stop(full.choices[0].text)
    chunks = list(client.completions.create(model=model_id, prompt=PROMPT, max_tokens=24, temperature=0,
                                            stop=[stop], stream=True))
    assert "".join(ch.text for c in chunks for ch in c.choices) == full.choices[0].text[:position]
    assert chunks[-1].choices[0].finish_reason == "stop"
    # n=2: every choice streamed under its own index, same texts as the plain request.
    kwargs = dict(model=model_id, prompt=PROMPT, max_tokens=5, temperature=1.0, seed=5, n=2)
    plain = client.completions.create(**kwargs)
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for chunk in client.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in plain.choices}
    assert finishes == {0: "length", 1: "length"}


def test_stream_flushes_unfinished_stop_prefix(client: openai.OpenAI, model_id: str) -> None:
    """Text held back because it might begin a stop string comes out when the length runs out."""
    full = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=12, temperature=0)
    text = full.choices[0].text
    stop = text[-2:] + "\u2603"  # its first two characters end the text; the stop never completes
    plain = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop)
    assert plain.choices[0].text == text
    assert plain.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model=model_id, prompt=PROMPT, max_tokens=12, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(ch.text for c in chunks for ch in c.choices) == text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completion_stream_echo(client: openai.OpenAI, model_id: str) -> None:
    kwargs = dict(model=model_id, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    plain = client.completions.create(**kwargs)
    streamed = "".join(ch.text for c in client.completions.create(**kwargs, stream=True) for ch in c.choices)
    assert streamed == plain.choices[0].text
    assert streamed.startswith(PROMPT)


def test_chat_stream_matches_non_stream(client: openai.OpenAI, model_id: str) -> None:
    kwargs = dict(model=model_id, messages=CHAT_MESSAGES, max_tokens=10, temperature=1.0, seed=42)
    plain = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in content) == plain.choices[0].message.content
    assert content[-1].choices[0].finish_reason == plain.choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert not chunks[-1].choices
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()
    # Stop strings apply to the stream too.
    greedy = client.chat.completions.create(model=model_id, messages=CHAT_MESSAGES, max_tokens=24, temperature=0)
    stop, position = pick_stop(greedy.choices[0].message.content)
    stopped = list(client.chat.completions.create(model=model_id, messages=CHAT_MESSAGES, max_tokens=24,
                                                  temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in stopped if c.choices) == \
        greedy.choices[0].message.content[:position]
    assert stopped[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": PROMPT}),
    ("/v1/chat/completions", {"messages": CHAT_MESSAGES}),
])
def test_raw_sse_ends_with_done(server: Any, model_id: str, path: str, body: dict[str, Any]) -> None:
    payload = {"model": model_id, "max_tokens": 5, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}, **body}
    response = requests.post(server.url + path, json=payload, timeout=60)
    data = sse_data_lines(response)
    assert data[-1] == "[DONE]"
    assert data.count("[DONE]") == 1
    events = [json.loads(line) for line in data[:-1]]  # every other event is JSON
    assert events
    assert all(isinstance(event, dict) and "choices" in event for event in events)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5
    # Events are separated by blank lines.
    assert response.content.decode("utf-8").count("\n\n") >= len(data) - 1


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": PROMPT, "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": 42}, "prompt"),
    ("/v1/chat/completions", {"messages": CHAT_MESSAGES, "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"messages": CHAT_MESSAGES, "max_tokens": -1}, "max_tokens"),
    ("/v1/chat/completions", {"messages": "hello"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
])
def test_bad_types_are_400(server: Any, model_id: str, path: str, body: dict[str, Any], param: str) -> None:
    response = server.post(path, json={"model": model_id, **body})
    error = assert_openai_error(response, 400, param=param)
    assert error["type"] == "invalid_request_error"


def test_bad_types_with_client(client: openai.OpenAI, model_id: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_id, prompt=PROMPT, temperature="hot")  # type: ignore[arg-type]
    assert info.value.status_code == 400
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model_id, prompt=PROMPT, max_tokens=-1)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_id, messages="hello")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_id, messages=CHAT_MESSAGES, temperature="hot")  # type: ignore
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_id, messages=CHAT_MESSAGES, max_tokens=-1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model_id, prompt=PROMPT, max_tokens=2, n=0)


def test_other_errors_have_openai_shape(server: Any, model_id: str) -> None:
    response = server.post("/v1/completions", data=b"{not json", headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400)
    assert_openai_error(server.get("/v1/no-such-route"), 404)
    response = server.post("/v1/completions", json={"model": model_id, "prompt": PROMPT, "max_tokens": 2, "n": 9})
    assert_openai_error(response, 400, param="n")
    # max_tokens beyond the context is clamped (KoboldCpp's rule), leaving room for the prompt.
    response = server.post("/v1/completions", json={"model": model_id, "prompt": PROMPT, "max_tokens": 100000,
                                                    "temperature": 0, "ban_eos_token": True})
    assert response.status_code == 200, response.text
    context = server.get("/api/extra/true_max_context_length").json()["value"]
    assert response.json()["usage"]["total_tokens"] <= context


def test_prompt_longer_than_context_is_cut_from_the_left(client: openai.OpenAI, model_id: str, server: Any) -> None:
    """Like KoboldCpp, the oldest tokens go (SillyTavern's KoboldCpp mode relies on it)."""
    context = server.get("/api/extra/true_max_context_length").json()["value"]
    prompt = "".join(chr(ord("a") + i % 26) for i in range(5000))
    assert token_count(server, prompt) > context
    for stream in (False, True):
        completion = client.completions.create(model=model_id, prompt=prompt, max_tokens=5, temperature=0,
                                               stream=stream, extra_body={"ban_eos_token": True})
        if stream:
            assert "".join(chunk.choices[0].text for chunk in completion)
            continue
        assert completion.usage.prompt_tokens == context - 5 and completion.usage.completion_tokens == 5
        chat = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": prompt}],
                                              max_tokens=5, temperature=0, extra_body={"ban_eos_token": True})
        assert chat.usage.prompt_tokens == context - 5
    # The kept part is the end of the prompt: echo shows the whole prompt, and a plain-Kobold request
    # of the prompt's tail gives the same continuation.
    tail = prompt[-(context - 5):]  # byte-level tiny model: one token per ASCII character
    cut = server.post("/v1/completions", json={"prompt": prompt, "max_tokens": 5, "temperature": 0})
    kept = server.post("/api/v1/generate", json={"prompt": tail, "max_length": 5, "temperature": 0})
    assert cut.json()["choices"][0]["text"] == kept.json()["results"][0]["text"]
    # A client context smaller than the server's (SillyTavern's truncation_length) cuts more.
    small = server.post("/v1/completions", json={"prompt": prompt, "max_tokens": 5, "temperature": 0,
                                                 "truncation_length": 100, "ban_eos_token": True})
    assert small.json()["usage"]["prompt_tokens"] == 95


# --- API key ----------------------------------------------------------------------------


def test_api_key(start_server: Any, tiny_engine: Any, test_settings: Any) -> None:
    from dataclasses import replace

    server = start_server(tiny_engine, replace(test_settings, api_key="secret"))
    with client_for(server, api_key="wrong") as wrong, client_for(server, api_key="secret") as right:
        _check_api_key(server, wrong, right)


def _check_api_key(server: Any, wrong: openai.OpenAI, right: openai.OpenAI) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.models.list()
    assert info.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="m", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="m", messages=CHAT_MESSAGES, max_tokens=2)
    assert_openai_error(server.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}), 401)
    model = right.models.list().data[0].id
    result = right.completions.create(model=model, prompt=PROMPT, max_tokens=2, temperature=0)
    assert result.usage.completion_tokens == 2
    chat = right.chat.completions.create(model=model, messages=CHAT_MESSAGES, max_tokens=2, temperature=0)
    assert chat.usage.completion_tokens == 2


def test_completion_logprobs(client: openai.OpenAI, model_id: str) -> None:
    completion = client.completions.create(model=model_id, prompt="Hello", max_tokens=6, temperature=0,
                                           logprobs=3, extra_body={"ban_eos_token": True})
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert all(lp <= 0.0 for lp in logprobs.token_logprobs)
    for token, chosen, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3
        # Greedy: the chosen token is the most likely one, so it heads the alternatives.
        assert max(top.values()) == pytest.approx(chosen)
        assert top[token] == pytest.approx(chosen)
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    plain = client.completions.create(model=model_id, prompt="Hello", max_tokens=6, temperature=0,
                                      extra_body={"ban_eos_token": True})
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].text == completion.choices[0].text


def test_chat_logprobs(client: openai.OpenAI, model_id: str) -> None:
    chat = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body={"ban_eos_token": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    for item in content:
        assert item.logprob <= 0.0 and len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)
        assert item.bytes == list(item.token.encode("utf-8"))


def test_completion_token_id_prompt(client: openai.OpenAI, model_id: str, server: Any) -> None:
    ids = server.post("/api/extra/tokencount", json={"prompt": "Hello there"}).json()["ids"]
    by_text = client.completions.create(model=model_id, prompt="Hello there", max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=model_id, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == len(ids)
    batch = client.completions.create(model=model_id, prompt=[ids, ids], max_tokens=8, temperature=0)
    assert [c.text for c in batch.choices] == [by_text.choices[0].text] * 2
    response = requests.post(server.url + "/v1/completions", json={"prompt": [10**9], "max_tokens": 2}, timeout=30)
    assert_openai_error(response, 400, param="prompt")


def test_chat_completion_with_server_side_conversation(client: openai.OpenAI, model_id: str, server: Any) -> None:
    """Extension: conversation_id makes the server keep the history; the client sends one message."""
    created = server.post("/api/v1/conversations", json={"character": "Assistant", "user_name": "Ann"}).json()
    conversation_id = created["result"]["id"]
    for text in ("First question?", "Second question?"):
        chat = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": text}],
                                              max_tokens=6, temperature=0,
                                              extra_body={"conversation_id": conversation_id})
        assert chat.choices[0].finish_reason in ("stop", "length")
        assert chat.usage.prompt_tokens > 0
    stored = server.get(f"/api/v1/conversations/{conversation_id}").json()["result"]["messages"]
    assert [m["role"] for m in stored] == ["character", "user", "character", "user", "character"]
    assert stored[3]["text"] == "Second question?"
    assert stored[4]["text"] == chat.choices[0].message.content


def test_streamed_server_side_turn_ends_at_the_stored_reply(client: openai.OpenAI, model_id: str,
                                                            server: Any) -> None:
    """Extension, streamed: the chunks join to exactly what was stored, and the last names the
    conversation; a plain-character stream stores nothing."""
    created = server.post("/api/v1/conversations", json={"character": "Assistant", "user_name": "Ann"}).json()
    conversation_id = created["result"]["id"]
    chunks = list(client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Tell me something."}], max_tokens=12,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"conversation_id": conversation_id}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].delta.model_extra["conversation_id"] == conversation_id
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    stored = server.get(f"/api/v1/conversations/{conversation_id}").json()["result"]["messages"]
    assert stored[-1]["role"] == "character" and stored[-1]["text"] == text
    before = server.get("/api/v1/conversations").json()["results"]
    raw = requests.post(server.url + "/v1/chat/completions", timeout=30, stream=True,
                        json={"messages": [{"role": "user", "content": "Hi"}], "character": "Mira Vance",
                              "stream": True, "max_tokens": 5, "temperature": 0}).content
    assert raw.rstrip().endswith(b"data: [DONE]") and b'"content"' in raw
    assert server.get("/api/v1/conversations").json()["results"] == before


def test_chat_completion_with_character_is_stateless(client: openai.OpenAI, model_id: str, server: Any) -> None:
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"},
                {"role": "user", "content": "How are you?"}]
    chat = client.chat.completions.create(model=model_id, messages=messages, max_tokens=6, temperature=0,
                                          extra_body={"character": "Mira Vance"})
    short = client.chat.completions.create(model=model_id, messages=messages[-1:], max_tokens=6, temperature=0,
                                           extra_body={"character": "Mira Vance"})
    assert chat.usage.prompt_tokens > short.usage.prompt_tokens  # earlier messages became the history
    assert server.get("/api/v1/conversations").json()["results"] == []
    response = requests.post(server.url + "/v1/chat/completions", timeout=30,
                             json={"messages": messages, "character": "Nobody Here"})
    assert response.status_code == 404 and "error" in response.json()


def test_chat_completion_with_character_and_no_turn_lets_the_character_speak(client: openai.OpenAI,
                                                                             model_id: str) -> None:
    # Only a system message (or an empty assistant "reply here" message): the character opens.
    for messages in ([{"role": "system", "content": "Be brief."}],
                     [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": ""}]):
        chat = client.chat.completions.create(model=model_id, messages=messages, max_tokens=6, temperature=0,
                                              extra_body={"character": "Mira Vance"})
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
        assert chat.choices[0].finish_reason in ("stop", "length")
