"""Ollama's API (/api/version, tags, ps, show, generate, chat) through the official ``ollama``
client, against a real waitress server on the tiny random model.

The model writes random bytes, so the tests check structure, counts and reproducibility (a fixed
``seed``), never wording; stop strings are picked from a first, unstopped run.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import ollama
import pytest
import requests

from conftest import LiveServer, close_server, make_engine, module_server
from kobold_api.app import create_app
from kobold_api.settings import Settings

SEED = 4321
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]}},
          "required": ["ok", "color"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tiny_engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server for the module (closing a waitress server takes about a second)."""
    live = module_server(tiny_engine, tmp_path_factory.mktemp("ollama-server"))
    yield live
    close_server(live)


@pytest.fixture
def client(server: LiveServer) -> Iterator[ollama.Client]:
    with ollama.Client(host=server.url, timeout=60) as client:
        yield client


def _options(**more: Any) -> dict[str, Any]:
    return {"seed": SEED, "temperature": 1.0, "num_predict": 24, **more}


# --- listings ---------------------------------------------------------------------------
def test_version(server: LiveServer) -> None:
    response = server.get("/api/version")
    assert response.status_code == 200
    assert response.json() == {"version": "0.7.0"}


def test_list_and_ps_describe_the_loaded_model(client: ollama.Client) -> None:
    listed = client.list()
    assert len(listed.models) == 1
    model = listed.models[0]
    assert model.model and model.model.endswith(":latest")
    assert isinstance(model.modified_at, datetime)
    assert model.size and model.size > 0 and model.digest and len(model.digest) == 64
    assert model.details and model.details.family == "llama" and model.details.families == ["llama"]
    assert model.details.format == "onnx" and model.details.quantization_level

    running = client.ps()
    assert len(running.models) == 1
    entry = running.models[0]
    assert entry.model == model.model and entry.name == model.model
    assert isinstance(entry.expires_at, datetime) and entry.size_vram == 0
    assert entry.context_length and entry.context_length > 0


def test_show(client: ollama.Client, server: LiveServer) -> None:
    shown = client.show("whatever-name")  # any name describes the loaded model
    assert shown.capabilities == ["completion", "tools"]
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] > 0
    assert shown.details and shown.details.family == "llama"
    assert shown.template and "num_ctx" in (shown.parameters or "") and shown.modelfile
    assert server.post("/api/show", json={"name": "x"}).json()["capabilities"] == ["completion", "tools"]


# --- generate ---------------------------------------------------------------------------
def _check_done(final: Any, limit: int) -> None:
    assert final.done is True and final.done_reason in ("stop", "length")
    assert 0 < final.eval_count <= limit
    assert final.prompt_eval_count > 0
    # The durations are reported (integers, in nanoseconds); their size is for benchmarks, not tests.
    assert all(isinstance(value, int) for value in (final.total_duration, final.prompt_eval_duration,
                                                    final.eval_duration))
    assert final.load_duration is not None


def test_generate_non_streaming_and_context_round_trip(client: ollama.Client) -> None:
    first = client.generate(model="tiny", prompt="Hello there", options=_options(num_predict=8))
    assert first.model == "tiny" and isinstance(first.response, str) and first.created_at
    _check_done(first, 8)
    assert first.context and all(isinstance(token, int) for token in first.context)
    assert len(first.context) >= first.prompt_eval_count

    follow_up = client.generate(model="tiny", prompt="And then?", context=first.context,
                                options=_options(num_predict=8))
    _check_done(follow_up, 8)
    assert follow_up.prompt_eval_count > len(first.context)  # the earlier tokens came first
    assert follow_up.context[:len(first.context)] == list(first.context)


def test_generate_streaming_pieces_join_to_the_text(client: ollama.Client) -> None:
    whole = client.generate(model="tiny", prompt="Once", options=_options())
    parts = list(client.generate(model="tiny", prompt="Once", options=_options(), stream=True))
    assert len(parts) >= 2
    assert all(part.done is False for part in parts[:-1]) and parts[-1].done is True
    _check_done(parts[-1], 24)
    assert parts[-1].response == "" and parts[-1].context
    assert "".join(part.response or "" for part in parts) == whole.response  # same seed, same text
    assert parts[-1].eval_count == whole.eval_count


def test_ndjson_is_the_default_stream(server: LiveServer) -> None:
    with requests.post(server.url + "/api/generate", json={"model": "m", "prompt": "Hi", "options": _options()},
                       stream=True, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [line for line in response.iter_lines() if line]
    objects = [json.loads(line) for line in lines]
    assert all(isinstance(item, dict) and item["model"] == "m" for item in objects)
    assert [item["done"] for item in objects] == [False] * (len(objects) - 1) + [True]
    final = objects[-1]
    for key in ("done_reason", "context", "total_duration", "load_duration", "prompt_eval_count",
                "prompt_eval_duration", "eval_count", "eval_duration"):
        assert key in final, key


def test_raw_prompt_and_load_request(client: ollama.Client) -> None:
    raw = client.generate(model="tiny", prompt="abc", raw=True, options=_options(num_predict=4))
    templated = client.generate(model="tiny", prompt="abc", options=_options(num_predict=4))
    assert raw.prompt_eval_count < templated.prompt_eval_count  # no chat template around it
    loaded = client.generate(model="tiny")
    assert loaded.done is True and loaded.done_reason == "load" and loaded.response == ""


# --- chat -------------------------------------------------------------------------------
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]


def test_chat_non_streaming_and_streaming(client: ollama.Client) -> None:
    whole = client.chat(model="tiny", messages=MESSAGES, options=_options())
    assert whole.message.role == "assistant" and isinstance(whole.message.content, str)
    _check_done(whole, 24)
    parts = list(client.chat(model="tiny", messages=MESSAGES, options=_options(), stream=True))
    assert all(part.done is False and part.message.role == "assistant" for part in parts[:-1])
    final = parts[-1]
    assert final.done is True and final.message.content == ""
    _check_done(final, 24)
    assert "".join(part.message.content or "" for part in parts) == whole.message.content


def test_chat_without_messages_is_a_load_request(client: ollama.Client) -> None:
    loaded = client.chat(model="tiny", messages=[])
    assert loaded.done is True and loaded.done_reason == "load" and loaded.message.content == ""


# --- format (constrained decoding) -------------------------------------------------------
def test_format_json_is_a_json_object(client: ollama.Client) -> None:
    reply = client.generate(model="tiny", prompt="Some JSON please", format="json",
                            options={"seed": 1, "temperature": 1.0})
    assert reply.done_reason == "stop", reply.response[-200:]
    assert isinstance(json.loads(reply.response), dict)


def test_format_schema_validates(client: ollama.Client) -> None:
    for seed in (0, 2):
        reply = client.chat(model="tiny", messages=MESSAGES, format=SCHEMA, options={"seed": seed})
        jsonschema.validate(json.loads(reply.message.content), SCHEMA)


def test_bad_format_schema_is_400(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(model="tiny", prompt="x", format={"type": "no-such-type"})
    assert caught.value.status_code == 400 and "format" in caught.value.error


# --- options ----------------------------------------------------------------------------
def test_num_predict_bounds_the_reply(client: ollama.Client) -> None:
    for limit in (1, 5):
        reply = client.generate(model="tiny", prompt="Count", options={"num_predict": limit, "ban_eos_token": True})
        assert reply.eval_count == limit and reply.done_reason == "length"


def test_seed_makes_runs_equal(client: ollama.Client) -> None:
    options = _options(num_predict=32, temperature=1.5, top_k=0, top_p=1.0)
    first = client.generate(model="tiny", prompt="Seeded", options=options)
    second = client.generate(model="tiny", prompt="Seeded", options=options)
    assert first.response == second.response and first.eval_count == second.eval_count
    other = client.generate(model="tiny", prompt="Seeded", options={**options, "seed": SEED + 1})
    assert other.response != first.response


def test_stop_ends_at_the_stop_string(client: ollama.Client) -> None:
    options = _options(num_predict=48, ban_eos_token=True)
    free = client.generate(model="tiny", prompt="Go", raw=True, options=options)
    text = free.response or ""
    stops = [text[index:index + 2] for index in range(3, len(text) - 2) if text[index:index + 2].isalnum()]
    assert stops, text
    stop = stops[0]
    stopped = client.generate(model="tiny", prompt="Go", raw=True, options={**options, "stop": [stop]})
    assert stopped.response == text[:text.index(stop)]
    assert stopped.done_reason == "stop"


def test_ollama_option_names_and_defaults_are_read(server: LiveServer, tiny_engine: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of Ollama's names reaches the engine as the sampler setting it stands for, and the
    length and context options act on the reply and the prompt."""
    submitted: list[Any] = []
    original = tiny_engine.submit
    monkeypatch.setattr(tiny_engine, "submit", lambda request, *a, **k: (submitted.append(request),
                                                                         original(request, *a, **k))[1])
    options = {"num_predict": 3, "num_ctx": 64, "repeat_last_n": -1, "repeat_penalty": 1.2, "typical_p": 0.9,
               "tfs_z": 0.95, "min_p": 0.05, "mirostat": 0, "num_keep": 5, "num_gpu": 99, "penalize_newline": True,
               "ban_eos_token": True}
    body = {"prompt": "a long prompt " * 40, "stream": False, "options": options}
    response = server.post("/api/generate", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["eval_count"] == 3 and answer["done_reason"] == "length"  # num_predict limits the reply
    whole = server.post("/api/extra/tokencount", json={"prompt": body["prompt"]}).json()["value"]
    assert answer["prompt_eval_count"] <= 64 - 3 < whole  # num_ctx cut the prompt to fit with the reply
    request = submitted[-1]
    assert (request.max_new_tokens, request.max_context_length) == (3, 64)
    sampling = request.sampling
    assert (sampling.rep_pen, sampling.rep_pen_range, sampling.typical, sampling.tfs, sampling.min_p,
            sampling.mirostat) == (1.2, 0, 0.9, 0.95, 0.05, 0)  # repeat_last_n -1: the whole context
    # Left out, Ollama's own defaults apply (its repeat_penalty 1.1 over the last 64 tokens).
    assert server.post("/api/generate", json={"prompt": "x", "stream": False,
                                              "options": {"num_predict": 1}}).status_code == 200
    defaults = submitted[-1].sampling
    assert (submitted[-1].max_new_tokens, defaults.rep_pen, defaults.rep_pen_range) == (1, 1.1, 64)


# --- refusals and errors ----------------------------------------------------------------
def test_images_are_refused(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(model="tiny", prompt="What is this?", images=[b"\x89PNG not really"])
    assert caught.value.status_code == 400 and "vision" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="tiny", messages=[{"role": "user", "content": "Look", "images": [b"GIF89a"]}])
    assert caught.value.status_code == 400 and "vision" in caught.value.error


def test_tools_with_the_official_client(client: ollama.Client, server: LiveServer) -> None:
    """A Python function as the tool (the client derives its schema); the reply is a call with
    object arguments or plain text; streamed, the call comes in the last object."""
    def get_weather(city: str) -> str:
        """Weather in a city.

        Args:
          city: The city
        """
        return city

    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    # The random model seldom opens with "{" (or closes a string): biases make short calls likely
    # (the shared options take logit_bias).
    brace, quote, close = server.post("/api/extra/tokenize", json={"prompt": '{"}'}).json()["ids"]
    bias = {str(brace): 6.0, str(quote): 5.0, str(close): 5.0}
    called = 0
    for seed in range(4):
        reply = client.chat(model="tiny", messages=messages, tools=[get_weather],
                            options={"seed": seed, "num_predict": 150, "temperature": 1.0,
                                     "logit_bias": bias})
        if reply.message.tool_calls:
            called += 1
            call = reply.message.tool_calls[0]
            assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
            assert isinstance(call.function.arguments["city"], str)
        else:  # plain text, or a call cut short by num_predict
            assert reply.done_reason == "length" or not reply.message.content.lstrip().startswith("{")
    assert called, "no reply of four was a call"
    lines = [json.loads(line) for line in server.post("/api/chat", stream=True, json={
        "model": "tiny", "messages": messages,
        "options": {"seed": 0, "num_predict": 150, "temperature": 1.0, "logit_bias": bias},
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"]}}}],
    }).iter_lines() if line]
    pieces = "".join(line["message"]["content"] for line in lines)
    last = lines[-1]["message"]
    assert last["tool_calls"][0]["function"]["name"] == "get_weather"
    assert pieces == ""  # the call's text is never streamed as content
    # A call and its result in the history are read back.
    history = [*messages, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "4 degrees", "tool_name": "get_weather"}]
    assert client.chat(model="tiny", messages=history, options={"num_predict": 3}).done
    response = server.post("/api/chat", json={"model": "m", "messages": messages, "format": "json",
                                              "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert response.status_code == 400 and "tools" in response.json()["error"]


def test_suffix_and_template_are_refused_clearly(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(model="tiny", prompt="def f(", suffix="return 1")
    assert caught.value.status_code == 400 and "suffix" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(model="tiny", prompt="x", template="{{ .Prompt }}")
    assert caught.value.status_code == 400 and "template" in caught.value.error


@pytest.mark.parametrize("options", [{"temperature": "hot"}, {"top_k": -5}, {"num_ctx": 0}, {"stop": 7},
                                     {"seed": "x"}, {"repeat_last_n": -3}])
def test_bad_options_are_400_in_ollama_shape(server: LiveServer, options: dict[str, Any]) -> None:
    response = server.post("/api/generate", json={"model": "m", "prompt": "x", "options": options})
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    assert next(iter(options)) in body["error"]


def test_error_shapes_by_path(server: LiveServer) -> None:
    assert server.post("/api/chat", json={"messages": [{"role": "robot"}]}).json().keys() == {"error"}
    assert server.post("/api/generate", data=b"{not json").json().keys() == {"error"}
    missing = server.post("/api/embed", json={"model": "m", "input": "x"})
    assert missing.status_code == 404 and missing.json().keys() == {"error"}
    # The Kobold routes beside them keep their own shape.
    kobold = server.post("/api/v1/generate", json={"prompt": "x", "temperature": "hot"})
    assert kobold.status_code == 422 and "detail" in kobold.json()
    assert "detail" in server.get("/api/extra/nothing-here").json()


def test_openapi_documents_the_ollama_routes(server: LiveServer) -> None:
    paths = server.get("/api/openapi.json").json()["paths"]
    for path, method in [("/api/version", "get"), ("/api/tags", "get"), ("/api/ps", "get"), ("/api/show", "post"),
                         ("/api/generate", "post"), ("/api/chat", "post")]:
        assert method in paths[path], path
    generate = paths["/api/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert generate["properties"]["images"]["maxItems"] == 0


# --- disconnect -------------------------------------------------------------------------
def test_client_disconnect_cancels_the_stream(tiny_model_dir: Path, tmp_path: Path) -> None:
    engine = make_engine(tiny_model_dir, prefix_cache_mb=0)
    model = engine.generator.model
    for name in ("run_shared", "run_concat"):  # a few ms per token, so the stream is still running
        original = getattr(model, name, None)
        if original is not None:
            setattr(model, name, lambda *a, _original=original, **k: (time.sleep(0.004), _original(*a, **k))[1])
    live = module_server(engine, tmp_path)
    try:
        long = {"num_predict": 400, "temperature": 0, "ban_eos_token": True}
        response = requests.post(live.url + "/api/generate", json={"prompt": "Hi", "options": long},
                                 stream=True, timeout=60)
        first = next(line for line in response.iter_lines() if line)
        assert json.loads(first)["done"] is False
        response.close()
        deadline = time.monotonic() + 20
        while engine.stats.total_generations < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        perf = live.get("/api/extra/perf").json()
        assert perf["total_gens"] == 1 and perf["last_token_count"] < 200, perf
    finally:
        close_server(live)
        engine.shutdown()


def test_api_key_applies_and_the_client_can_send_it(tiny_engine: Any, test_settings: Settings) -> None:
    app = create_app(replace(test_settings, api_key="secret"), tiny_engine)
    try:
        web = app.test_client()
        refused = web.post("/api/chat", json={"messages": []})
        assert refused.status_code == 401 and set(refused.get_json()) == {"error"}
        allowed = web.get("/api/tags", headers={"Authorization": "Bearer secret"})
        assert allowed.status_code == 200 and allowed.get_json()["models"]
    finally:
        app.extensions["kobold_api"].chat.conversations.close()
