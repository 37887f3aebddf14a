"""Structured output and logprobs against a real server on the tiny random model.

The model is random, so what it writes is noise: every test checks that the noise obeys the
grammar or schema it was given (checked by means independent of the engine: ``json``,
``jsonschema``, regular expressions, a small parser), and that logprobs line up with the text.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
import regex

from json_check import check_constrained_json, json_state
from sse_client import parse_all

GRAMMARS = Path(__file__).parent / "data" / "grammars"
LETTERS = 'root ::= [a-z ]+'  # ASCII only: every byte-level token is one whole character

_MOVE = r"(?:(?:[a-h]x)?[a-h][1-8](?:=[NBKQR])?|[NBKQR][a-h]?[1-8]?x?[a-h][1-8]|O-O(?:-O)?)[+#]?"
_CHESS_LINE = rf"[1-9][0-9]?\. {_MOVE} {_MOVE}\n"


class _Ended(Exception):
    """The text ended inside a line: a prefix so far."""


def _arithmetic_state(text: str) -> str:
    """llama.cpp's arithmetic.gbnf, checked by a small recursive-descent parser of our own:
    ``complete``, ``prefix`` (the text ran out inside a line) or ``invalid``."""
    try:
        return "complete" if _arithmetic_ok(text) else "invalid"
    except _Ended:
        return "prefix"


def _arithmetic_ok(text: str) -> bool:
    position = 0

    def more() -> None:
        if position >= len(text):
            raise _Ended

    def ws() -> None:
        nonlocal position
        while position < len(text) and text[position] in " \t\n":
            position += 1

    def term() -> bool:
        nonlocal position
        more()
        match = re.compile(r"[a-z][a-z0-9_]*|[0-9]+").match(text, position)
        if match:
            position = match.end()
            ws()
            return True
        if text.startswith("(", position):
            position += 1
            ws()
            if not expr():
                return False
            more()
            if not text.startswith(")", position):
                return False
            position += 1
            ws()
            return True
        return False

    def expr() -> bool:
        nonlocal position
        if not term():
            return False
        while position < len(text) and text[position] in "-+*/":
            position += 1
            if not term():
                return False
        return True

    lines = 0
    while position < len(text):
        if not expr():
            return False
        more()
        if not text.startswith("=", position):
            return False
        position += 1
        ws()
        if not term():
            return False
        # ``term`` ate trailing whitespace, the line's "\n" included: it must have been there.
        if text[position - 1] != "\n":
            more()  # at the end the newline may still come
            return False
        lines += 1
    return lines > 0


def _regex_state(pattern: str) -> Any:
    """complete / prefix / invalid by a regular expression (the ``regex`` module's partial
    matching says whether some continuation could still match)."""
    def state(text: str) -> str:
        match = regex.fullmatch(pattern, text, partial=True)
        return "invalid" if match is None else "prefix" if match.partial else "complete"
    return state


def _json_gbnf_state(text: str) -> str:
    state = json_state(text, trailing_whitespace=True)
    return "invalid" if state == "complete" and not text.lstrip().startswith("{") else state


#: llama.cpp's sample grammars, each judged by our own means: complete, prefix or invalid.
JUDGES = {
    "json.gbnf": _json_gbnf_state,
    "list.gbnf": _regex_state(r"(- [^\r\n\x0b\x0c\x85\u2028\u2029]+\n)+"),
    "chess.gbnf": _regex_state(rf"1\. {_MOVE} {_MOVE}\n(?:{_CHESS_LINE})+"),
    "arithmetic.gbnf": _arithmetic_state,
}


def _generate(server: Any, **body: Any) -> dict[str, Any]:
    body.setdefault("prompt", "Write:")
    response = server.post("/api/v1/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()["results"][0]


@pytest.mark.parametrize("name", sorted(JUDGES))
def test_llama_cpp_sample_grammars(server: Any, name: str) -> None:
    """Each sample grammar: a finished output is accepted by it, one cut by length is a prefix
    of an accepted one (llama.cpp's grammars never force an end, so the EOS token gets a bias
    to end where the grammar allows)."""
    grammar = (GRAMMARS / name).read_text()
    bias = {"2": 4.0}  # 2 = <|im_end|>, the tiny model's EOS
    if name == "json.gbnf":  # random bytes make endless strings: favour closing them
        for token in server.post("/api/extra/tokenize", json={"prompt": '"}'}).json()["ids"]:
            bias[str(token)] = 5.0
    finished = 0
    for seed in range(4):
        result = _generate(server, grammar=grammar, max_length=120, temperature=1.0, sampler_seed=seed,
                           logit_bias=bias)
        state = JUDGES[name](result["text"])
        if result["finish_reason"] == "stop":
            finished += 1
            assert state == "complete", (name, result["text"])
        else:
            assert state in ("complete", "prefix") and result["text"], (name, result["text"])
    assert finished, f"no generation under {name} finished within 120 tokens"


def test_json_schema_as_grammar_validates(server: Any) -> None:
    """KoboldCpp's rule: a grammar that is a JSON schema is one; the outputs validate."""
    schema = {"type": "object", "properties": {
        "ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9},
        "tag": {"enum": ["red", "green"]}}, "required": ["ok", "n", "tag"], "additionalProperties": False}
    for seed in range(3):
        result = _generate(server, grammar=json.dumps(schema), max_length=64, temperature=1.0, sampler_seed=seed)
        assert result["finish_reason"] == "stop", result
        jsonschema.validate(json.loads(result["text"]), schema)


def test_invalid_grammar_is_a_422_naming_the_problem(server: Any) -> None:
    for grammar, words in (('root ::= missing', "missing"), ('root ::= "open', "end of input"),
                           ('{"type": "wat"}', "wat"), ('{"type": "object", "not": {}}', "not")):
        response = server.post("/api/v1/generate", json={"prompt": "x", "grammar": grammar})
        assert response.status_code == 422, response.text
        message = " ".join(response.json()["detail"]["grammar"])
        assert words in message, message
    response = server.post("/v1/completions", json={"prompt": "x", "grammar": "root ::= nope"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "grammar"


def test_grammar_with_stop_strings_phrase_bans_and_batching(server: Any) -> None:
    """n=3 decode together; a stop string and a phrase ban apply inside the grammar's language."""
    result = server.post("/api/v1/generate", json={
        "prompt": "Write:", "grammar": 'root ::= ("ab" | "cd" | "ef")+', "max_length": 40, "n": 3,
        "temperature": 1.0, "sampler_seed": 5, "banned_strings": ["cdab"], "stop_sequence": ["efef"]}).json()
    assert len(result["results"]) == 3
    for item in result["results"]:
        text = item["text"]
        # A stop string ends a grammar's output only where the grammar may end, so never on "".
        assert re.fullmatch(r"(ab|cd|ef)+", text), text
        assert "cdab" not in text and "efef" not in text


def test_grammar_retain_state_continues_the_last_generation(server: Any) -> None:
    grammar = 'root ::= "a" "b" "c" "d"'
    body = {"grammar": grammar, "max_length": 1, "temperature": 0}
    assert _generate(server, **body)["text"] == "a"
    assert _generate(server, **body)["text"] == "a"  # without retain_state every request starts afresh
    assert _generate(server, **body, grammar_retain_state=True)["text"] == "a"
    assert _generate(server, **body, grammar_retain_state=True)["text"] == "b"
    assert _generate(server, **body, grammar_retain_state=True)["text"] == "c"


def test_openai_structured_output_with_the_official_client(server: Any) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Who?"}], max_tokens=60, temperature=1.0, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    # Streaming the same: the pieces join to valid JSON.
    stream = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Who?"}], max_tokens=60, temperature=1.0, seed=2,
        stream=True, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), schema)
    # json_object on /v1/completions too (llama.cpp's form): output starts as an object.
    completion = client.completions.create(model="any", prompt="{", max_tokens=30, temperature=1.0,
                                           extra_body={"response_format": {"type": "json_object"}})
    value = check_constrained_json(completion.choices[0].text, completion.choices[0].finish_reason)
    assert value is None or isinstance(value, dict)


def test_kobold_logprobs_and_last_logprobs(server: Any) -> None:
    result = _generate(server, grammar=LETTERS, max_length=12, temperature=1.0, sampler_seed=3, logprobs=True,
                       genkey="KCPPLOG1")
    logprobs = result["logprobs"]
    assert len(logprobs["content"]) == result["completion_tokens"] == len(logprobs["tokens"])
    assert "".join(entry["token"] for entry in logprobs["content"]) == result["text"]
    for entry in logprobs["content"]:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 10
        assert entry["bytes"] == list(entry["token"].encode())
    assert logprobs["text_offset"][0] == 0
    assert server.post("/api/extra/last_logprobs", json={"genkey": "KCPPLOG1"}).json() == {"logprobs": logprobs}
    assert server.post("/api/extra/last_logprobs", json={"genkey": "KCPPOTHER"}).json() == {"logprobs": None}
    assert server.post("/api/extra/last_logprobs").json() == {"logprobs": None}
    plain = _generate(server, max_length=3, genkey="KCPPLOG2")
    assert "logprobs" not in plain
    assert server.post("/api/extra/last_logprobs", json={"genkey": "KCPPLOG2"}).json() == {"logprobs": None}


def test_kobold_stream_carries_each_events_logprobs(server: Any) -> None:
    response = server.post("/api/extra/generate/stream", stream=True, json={
        "prompt": "Write:", "grammar": LETTERS, "max_length": 16, "temperature": 1.0, "sampler_seed": 4,
        "logprobs": True})
    events, _ = parse_all(response.iter_content(chunk_size=None))
    payloads = [json.loads(event.data) for event in events]
    text, tokens = "", ""
    for payload in payloads:
        text += payload["token"]
        tokens += "".join(entry["token"] for entry in payload["logprobs"]["content"])
        assert tokens == text  # every event's logprobs are those of its own text
    assert payloads[-1]["finish_reason"] in ("length", "stop") and len(text) > 0


def test_openai_streams_carry_per_chunk_logprobs(server: Any) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    stream = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Hi"}], max_tokens=10, temperature=1.0, seed=6,
        stream=True, logprobs=True, top_logprobs=3, extra_body={"grammar": LETTERS})
    text = tokens = ""
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        text += choice.delta.content or ""
        if choice.logprobs is not None and choice.logprobs.content:
            tokens += "".join(entry.token for entry in choice.logprobs.content)
            assert all(len(entry.top_logprobs) == 3 for entry in choice.logprobs.content)
        assert tokens == text
    assert text
    # Completions: SillyTavern reads choices[0].logprobs.top_logprobs[0] of every chunk.
    response = server.post("/v1/completions", stream=True, json={
        "prompt": "Hi", "max_tokens": 10, "temperature": 1.0, "seed": 6, "stream": True, "logprobs": 5,
        "grammar": LETTERS})
    events, _ = parse_all(response.iter_content(chunk_size=None))
    chunks = [json.loads(event.data) for event in events if event.data != "[DONE]"]
    text = tokens = ""
    for chunk in chunks:
        choice = chunk["choices"][0]
        text += choice["text"]
        tokens += "".join(choice["logprobs"]["tokens"])
        assert tokens == text
        if choice["text"]:
            assert len(choice["logprobs"]["top_logprobs"][0]) == 5
            assert choice["logprobs"]["text_offset"][0] == len(text) - len(choice["text"])


def test_completions_echo_scores_the_prompt(server: Any) -> None:
    """echo + logprobs: the prompt's tokens come first, the first with null; each prompt token's
    logprob is what the model gives it after the tokens before it (checked against a generation)."""
    prompt = "abc de"
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 3}
    scored = server.post("/v1/completions", json=body).json()["choices"][0]
    logprobs = scored["logprobs"]
    assert scored["text"].startswith(prompt)
    assert "".join(logprobs["tokens"]) == scored["text"]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["text_offset"] == [sum(len(t) for t in logprobs["tokens"][:i])
                                       for i in range(len(logprobs["tokens"]))]
    assert len(logprobs["tokens"]) == len(prompt) + 1  # byte-level tokens, plus the generated one
    # A prompt token's logprob after the tokens before it is the one a generation reports for
    # that token when it continues them: score the greedy continuation of a shorter prompt.
    generated = server.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "temperature": 0,
                                                     "logprobs": 1}).json()["choices"][0]
    rescored = server.post("/v1/completions", json={**body, "prompt": prompt + generated["text"]}).json()
    rescored_logprobs = rescored["choices"][0]["logprobs"]
    assert rescored_logprobs["tokens"][len(prompt)] == generated["text"]
    assert math.isclose(rescored_logprobs["token_logprobs"][len(prompt)],
                        generated["logprobs"]["token_logprobs"][0], abs_tol=1e-4)
    assert rescored_logprobs["token_logprobs"][:len(prompt)] == pytest.approx(
        logprobs["token_logprobs"][:len(prompt)], abs=1e-4)
    # Without echo nothing of the prompt is scored.
    plain = server.post("/v1/completions", json={**body, "echo": False}).json()["choices"][0]["logprobs"]
    assert len(plain["tokens"]) == 1


def test_new_sampler_keys_are_read_and_checked(server: Any) -> None:
    for extra in ({"nsigma": 1.0}, {"top_n_sigma": 1.0}, {"adaptive_target": 0.4, "adaptive_decay": 0.8},
                  {"dynatemp_low": 0.5, "dynatemp_high": 1.5, "dynamic_temperature": True},
                  {"repeat_last_n": 64, "min_keep": 2, "n_predict": 3}):
        result = _generate(server, temperature=1.0, max_length=3, **extra)
        assert result["completion_tokens"] <= 3
    assert _generate(server, num_predict=2, temperature=1.0)["completion_tokens"] <= 2
    for bad in ({"nsigma": -1}, {"adaptive_target": 2}, {"adaptive_decay": 1.5}):
        response = server.post("/api/v1/generate", json={"prompt": "x", **bad})
        assert response.status_code == 422 and set(response.json()["detail"]) == set(bad)


def test_props_serviceinfo_and_capability_flags(server: Any) -> None:
    props = server.get("/props").json()
    context = server.get("/api/v1/config/max_context_length").json()["value"]
    assert props["n_ctx"] == props["default_generation_settings"]["n_ctx"] == context
    assert "im_start" in props["chat_template"] and props["modalities"] == {"vision": False, "audio": False}
    info = server.get("/.well-known/serviceinfo").json()
    assert info["api"]["koboldai"]["rel_url"] == "/api" and info["api"]["openai"]["rel_url"] == "/v1"
    version = server.get("/api/extra/version").json()
    assert version["llm"] is True and version["jinja"] is True and version["guidance"] is True
    assert not any(version[flag] for flag in ("txt2img", "vision", "audio", "embeddings", "admin"))


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}


def test_tool_calls_with_the_official_client(server: Any) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        reply = client.chat.completions.create(model="any", messages=messages, tools=[WEATHER, CLOCK],
                                               tool_choice=choice, max_tokens=150, temperature=1.0, seed=3)
        assert reply.choices[0].finish_reason == "tool_calls"
        call = reply.choices[0].message.tool_calls[0]
        assert reply.choices[0].message.content is None and call.id.startswith("call_")
        assert call.function.name in ("get_weather", "get_time")
        if choice != "required":
            assert call.function.name == "get_weather"
        schema = (WEATHER if call.function.name == "get_weather" else CLOCK)["function"]["parameters"]
        jsonschema.validate(json.loads(call.function.arguments), schema)
    # Streamed: the client assembles the call from the deltas.
    stream = client.chat.completions.create(model="any", messages=messages, tools=[WEATHER], tool_choice="required",
                                            max_tokens=150, temperature=1.0, seed=4, stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        for delta_call in chunk.choices[0].delta.tool_calls or ():
            entry = calls.setdefault(delta_call.index, {"name": "", "arguments": ""})
            entry["name"] += delta_call.function.name or ""
            entry["arguments"] += delta_call.function.arguments or ""
        assert not chunk.choices[0].delta.content
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])
    # "auto": a call or plain text, either well formed; a tool result in the history is read.
    history = [*messages, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees"}]
    for seed in range(3):
        reply = client.chat.completions.create(model="any", messages=history, tools=[WEATHER], max_tokens=150,
                                               temperature=1.0, seed=seed)
        choice = reply.choices[0]
        if choice.finish_reason == "tool_calls":
            jsonschema.validate(json.loads(choice.message.tool_calls[0].function.arguments),
                                WEATHER["function"]["parameters"])
        else:
            assert not choice.message.content.lstrip().startswith("{")
    # tool_choice "none": plain text, no calls.
    reply = client.chat.completions.create(model="any", messages=messages, tools=[WEATHER], tool_choice="none",
                                           max_tokens=5, temperature=1.0)
    assert reply.choices[0].message.tool_calls is None
    for bad in ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]},
                {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
                {"tools": [WEATHER], "response_format": {"type": "json_object"}}):
        response = server.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2, **bad})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] in ("tool_choice", "tools")


def test_kobold_generate_takes_tools(server: Any) -> None:
    """KoboldCpp's Kobold API returns ``tool_calls`` too (a JSON grammar is forced)."""
    result = _generate(server, tools=[WEATHER], tool_choice="required", max_length=150, temperature=1.0,
                       sampler_seed=2)
    assert result["finish_reason"] == "tool_calls"
    call = result["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
    response = server.post("/api/extra/generate/stream", stream=True, json={
        "prompt": "Weather?", "tools": [WEATHER], "tool_choice": "required", "max_length": 150,
        "temperature": 1.0, "sampler_seed": 2})
    events, _ = parse_all(response.iter_content(chunk_size=None))
    last = json.loads(events[-1].data)
    assert last["finish_reason"] == "tool_calls" and last["tool_calls"][0]["function"]["name"] == "get_weather"
    response = server.post("/api/v1/generate", json={"prompt": "x", "tools": [WEATHER], "grammar": LETTERS})
    assert response.status_code == 422 and "tools" in response.json()["detail"]


def test_json_to_grammar_gives_a_grammar_the_generate_route_takes(server: Any) -> None:
    schema = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99},
                                               "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                        "maxItems": 3}},
              "required": ["id", "tags"]}
    wrapped = server.post("/api/extra/json_to_grammar", json={"schema": schema}).json()
    bare = server.post("/api/extra/json_to_grammar", json=schema).json()
    assert wrapped == bare and wrapped["success"] is True and "root ::=" in wrapped["result"]
    finished = 0
    for seed in range(3):
        result = _generate(server, grammar=wrapped["result"], max_length=80, temperature=1.0, sampler_seed=seed,
                           logit_bias={"2": 4.0})
        # KoboldCpp's schema grammars allow whitespace after the value.
        value = check_constrained_json(result["text"], result["finish_reason"], trailing_whitespace=True)
        if value is not None:
            finished += 1
            jsonschema.validate(value, schema)
    assert finished
    response = server.post("/api/extra/json_to_grammar", json={"schema": {"type": "array", "uniqueItems": True}})
    assert response.status_code == 422 and "uniqueItems" in " ".join(response.json()["detail"]["schema"])


@pytest.mark.parametrize("samplers", [
    {"temperature": 0}, {"mirostat": 2, "mirostat_tau": 3.0}, {"xtc_probability": 1.0, "xtc_threshold": 0.05},
    {"dry_multiplier": 0.8, "rep_pen": 1.3}, {"typical": 0.5, "tfs": 0.7, "top_a": 0.2, "min_p": 0.05},
    {"nsigma": 1.0}, {"adaptive_target": 0.3}, {"smoothing_factor": 0.3, "dynatemp_range": 0.5}])
def test_grammar_holds_under_every_sampler(server: Any, samplers: dict[str, Any]) -> None:
    result = _generate(server, grammar='root ::= [a-f]+ ("." | "!")', max_length=30, sampler_seed=1,
                       logit_bias={"2": 3.0}, **{"temperature": 1.0, **samplers})
    pattern = r"[a-f]+[.!]" if result["finish_reason"] == "stop" else r"[a-f]+"
    assert re.fullmatch(pattern, result["text"]), (samplers, result)


def test_server_side_chat_takes_a_grammar(server: Any) -> None:
    response = server.post("/api/v1/chat", json={"user_input": "Hi", "grammar": 'root ::= [a-z]+ "!"',
                                                 "max_new_tokens": 24, "temperature": 1.0, "seed": 3})
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    reply = result["history"]["visible"][-1][1]
    assert re.fullmatch(r"[a-z]+!" if result["finish_reason"] == "stop" else r"[a-z]+", reply), (reply, result)
    bad = server.post("/api/v1/chat", json={"user_input": "Hi", "grammar": "root ::= nope"})
    assert bad.status_code == 422 and "grammar" in bad.json()["detail"]


def test_history_tool_calls_for_each_kind_of_template() -> None:
    from kobold_api.api.openai.schemas import Message

    message = Message.parse({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]})
    native = message.as_dict(template_renders_tools=True)
    assert native["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"} and native["content"] == ""
    written = message.as_dict(template_renders_tools=False)
    assert json.loads(written["content"]) == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert Message.parse({"role": "tool", "tool_call_id": "call_1", "content": "4"}).as_dict()["tool_call_id"] == "call_1"


def test_streamed_echo_carries_the_prompts_scores_first(server: Any) -> None:
    prompt = "abc de"
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 2}
    whole = server.post("/v1/completions", json=body).json()["choices"][0]
    response = server.post("/v1/completions", stream=True, json={**body, "stream": True})
    events, _ = parse_all(response.iter_content(chunk_size=None))
    chunks = [json.loads(event.data)["choices"][0] for event in events if event.data != "[DONE]"]
    assert chunks[0]["text"] == prompt
    assert chunks[0]["logprobs"]["token_logprobs"][0] is None
    assert "".join(chunks[0]["logprobs"]["tokens"]) == prompt
    streamed = {key: sum((chunk["logprobs"][key] for chunk in chunks), []) for key in ("tokens", "text_offset")}
    assert streamed == {key: whole["logprobs"][key] for key in ("tokens", "text_offset")}
    scores = sum((chunk["logprobs"]["token_logprobs"] for chunk in chunks), [])
    assert scores == pytest.approx(whole["logprobs"]["token_logprobs"], abs=1e-4)
