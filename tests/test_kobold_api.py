"""Contract tests for the KoboldAI / KoboldCpp API, against a real waitress server over HTTP.

The wire protocol is in shared/reference/kobold_api.md (§1-§4, checklist §6). The tiny
test model emits random bytes (one token per byte), so the tests never expect
meaningful text: outputs are made reproducible with greedy decoding or a fixed
``sampler_seed``, and stop strings are picked from a first, unstopped run.

Generation on the tiny model is very fast (well under a millisecond per token), so
tests that must act *while* a generation runs (abort, disconnect, queue, check, SSE
incrementality) use their own engine whose model forward pass is throttled by a
few milliseconds per token: the server, routes and engine are the real ones.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests

from conftest import LiveServer, close_server, make_engine, module_server
from model_probe import ModelProbe, submit_together
from sse_client import EventSourceStream, SSEEvent, parse_all, sillytavern_text

PROMPT = "Hello world"
SEED = 1234
#: Per-token delay of the throttled engine; 400 tokens then take about 1.6 s.
THROTTLE_SECONDS = 0.004
LONG = 400
POLL_LIMIT_SECONDS = 20.0


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def generate(server: Any, path: str = "/api/v1/generate", **body: Any) -> dict[str, Any]:
    """POST a generate body, assert 200 and the Kobold success shape, return ``results[0]``."""
    body.setdefault("prompt", PROMPT)
    response = server.post(path, json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert isinstance(data, dict) and isinstance(data.get("results"), list) and data["results"], data
    for result in data["results"]:
        assert isinstance(result["text"], str)
        assert result["finish_reason"] in ("stop", "length"), result
    return data["results"][0]


def seeded(**overrides: Any) -> dict[str, Any]:
    """A reproducible sampled body (temperature 1, fixed seed, no early EOS)."""
    body = {"prompt": PROMPT, "max_length": 48, "temperature": 1, "sampler_seed": SEED, "ban_eos_token": True}
    body.update(overrides)
    return body


def greedy(**overrides: Any) -> dict[str, Any]:
    body = {"prompt": PROMPT, "max_length": 32, "temperature": 0, "ban_eos_token": True}
    body.update(overrides)
    return body


def stream(server: Any, body: dict[str, Any], session: requests.Session | None = None) -> tuple[
        requests.Response, list[SSEEvent], str, bytes]:
    """POST to the SSE route and read it to the end; returns (response, events, leftover, raw)."""
    http = session or requests
    response = http.post(server.url + "/api/extra/generate/stream", json=body, stream=True, timeout=60)
    assert response.status_code == 200, response.text
    raw = b""
    parser = EventSourceStream()
    events: list[SSEEvent] = []
    for chunk in response.iter_content(chunk_size=None):
        raw += chunk
        events.extend(parser.feed(chunk))
    return response, events, parser.close(), raw


def check_kobold_events(events: list[SSEEvent]) -> str:
    """Every KoboldCpp SSE rule; returns the text SillyTavern would show."""
    assert events, "the stream had no events"
    payloads = []
    for event in events:
        assert event.type == "message", f"event type {event.type!r}, expected an explicit 'event: message'"
        payload = event.json()  # SillyTavern JSON.parse()s every event
        assert isinstance(payload, dict) and isinstance(payload.get("token"), str), payload
        assert "finish_reason" in payload, payload
        payloads.append(payload)
    for payload in payloads[:-1]:
        assert payload["finish_reason"] is None, payloads  # JSON null, not the string "null"
    assert payloads[-1]["finish_reason"] in ("stop", "length"), payloads[-1]
    return sillytavern_text(events)


def perf(server: Any) -> dict[str, Any]:
    response = server.get("/api/extra/perf")
    assert response.status_code == 200, response.text
    return response.json()


def poll(predicate: Callable[[], Any], what: str, limit: float = POLL_LIMIT_SECONDS, step: float = 0.02) -> Any:
    """Call ``predicate`` until it is truthy (bounded); fail with ``what`` otherwise."""
    deadline = time.monotonic() + limit
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(step)


def wait_idle(server: Any) -> dict[str, Any]:
    return poll(lambda: (lambda p: p if p["idle"] == 1 and p["queue"] == 0 else None)(perf(server)),
                "the engine to become idle")


_SAFE_RUN = re.compile(r"[A-Za-z0-9.\-_=+^$!?|]{3,}")


def stop_candidates(text: str) -> list[tuple[int, str]]:
    """3-character ASCII substrings (3 tokens each) by first occurrence, not at the very start."""
    found: dict[str, int] = {}
    for match in _SAFE_RUN.finditer(text):
        for start in range(match.start(), match.end() - 2):
            candidate = text[start:start + 3]
            first = text.find(candidate)
            if first >= 3 and candidate not in found:
                found[candidate] = first
    return sorted(((index, stop) for stop, index in found.items()), key=lambda item: item[0])


def stop_case(server: Any, needed: int = 1) -> tuple[dict[str, Any], str, list[tuple[int, str]]]:
    """A seeded body, its unstopped text, and stop strings found in it (distinct first positions)."""
    for seed in range(SEED, SEED + 40):
        body = seeded(sampler_seed=seed)
        text = generate(server, **body)["text"]
        candidates: list[tuple[int, str]] = []
        for index, stop in stop_candidates(text):
            if all(index != other for other, _ in candidates):
                candidates.append((index, stop))
        if len(candidates) >= needed:
            return body, text, candidates
    pytest.fail("no seed gave an output with a usable 3-character ASCII stop string")


def locale_compare_numeric(a: str, b: str) -> int:
    """``a.localeCompare(b, undefined, {numeric: true, sensitivity: 'base'})`` for ASCII version strings.

    ICU root collation: punctuation < digits < letters, digit runs compare by value,
    letters compare case-insensitively (sensitivity 'base').
    """
    def keys(text: str) -> list[tuple[int, Any]]:
        out: list[tuple[int, Any]] = []
        for run in re.findall(r"\d+|.", text):
            if run.isdigit():
                out.append((1, int(run)))
            elif run.isalpha():
                out.append((2, run.lower()))
            else:
                out.append((0, run))
        return out

    ka, kb = keys(a), keys(b)
    return (ka > kb) - (ka < kb)


def st_flag(value: str | None, minimum: str) -> bool:
    """SillyTavern's setKoboldFlags test: ``(v || '0.0.0').localeCompare(min, ...) > -1``."""
    return locale_compare_numeric(value or "0.0.0", minimum) > -1


# --------------------------------------------------------------------------------------
# throttled engines for tests that act while a generation runs
# --------------------------------------------------------------------------------------
def throttle(engine: Any, seconds: float = THROTTLE_SECONDS) -> Any:
    """Delay every model run (single-sequence and batched) by ``seconds``."""
    model = engine.generator.model
    wrapped = 0
    for name in ("run_shared", "run_concat"):  # every session run goes through one of these
        original = getattr(model, name, None)
        if original is None:
            continue

        def slow(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            time.sleep(seconds)
            return _original(*args, **kwargs)

        setattr(model, name, slow)
        wrapped += 1
    assert wrapped, "the model has no forward method to throttle"
    return engine


@pytest.fixture(scope="module")
def slow_engine(tiny_model_dir: Path) -> Iterator[Any]:
    engine = throttle(make_engine(tiny_model_dir, prefix_cache_mb=0))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(tiny_engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Like conftest's ``server`` (default settings, tiny model) but shared by this module:
    closing a waitress server takes about a second, which would dominate the run time."""
    live = module_server(tiny_engine, tmp_path_factory.mktemp("kobold-server"))
    yield live
    close_server(live)


@pytest.fixture(scope="module")
def _slow_live_server(slow_engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = module_server(slow_engine, tmp_path_factory.mktemp("kobold-slow-server"))
    yield live
    close_server(live)


@pytest.fixture
def slow_server(_slow_live_server: LiveServer) -> LiveServer:
    """The throttled engine's server, idle at the start of each test."""
    wait_idle(_slow_live_server)
    return _slow_live_server


def long_body(**overrides: Any) -> dict[str, Any]:
    body = {"prompt": PROMPT, "max_length": LONG, "temperature": 0, "ban_eos_token": True}
    body.update(overrides)
    return body


# --------------------------------------------------------------------------------------
# the version comparison helper itself (so the probe tests below mean something)
# --------------------------------------------------------------------------------------
def test_locale_compare_port_matches_sillytavern_examples() -> None:
    assert st_flag("KoboldCpp", "1.48")  # the reference checked this in Node
    assert not st_flag(None, "1.30") and not st_flag("0.0.0", "1.30")
    assert st_flag("1.48", "1.48") and st_flag("1.100", "1.48") and not st_flag("1.47", "1.48")
    assert st_flag("1.2.5", "1.2.4") and not st_flag("1.2.3", "1.2.4")


# --------------------------------------------------------------------------------------
# GET probes and config
# --------------------------------------------------------------------------------------
PREFIXES = ["/api/v1", "/api/latest"]
SLASHES = ["", "/"]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("slash", SLASHES)
def test_model(server: Any, prefix: str, slash: str) -> None:
    response = server.get(f"{prefix}/model{slash}")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    data = response.json()
    assert set(data) == {"result"}
    assert isinstance(data["result"], str)
    assert data["result"] != "ReadOnly"  # SillyTavern and TavernAI treat that as offline
    assert data["result"].startswith("koboldcpp/") and len(data["result"]) > len("koboldcpp/")


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("slash", SLASHES)
def test_info_version(server: Any, prefix: str, slash: str) -> None:
    response = server.get(f"{prefix}/info/version{slash}")
    assert response.status_code == 200
    assert response.json() == {"result": "1.2.5"}
    version = response.json()["result"]
    assert st_flag(version, "1.2.4") and st_flag(version, "1.2.2")  # use_default_badwordsids, stop_sequence
    assert tuple(int(part) for part in version.split(".")) >= (1, 2, 4)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_info_version_latest_and_list(server: Any, prefix: str) -> None:
    latest = server.get(f"{prefix}/info/version/latest/")
    assert latest.status_code == 200 and latest.json() == {"result": "1.2.5"}
    listed = server.get(f"{prefix}/info/version/list")
    assert listed.status_code == 200
    data = listed.json()
    assert set(data) == {"results"} and isinstance(data["results"], list)
    assert "1.2.5" in data["results"] and all(isinstance(item, str) for item in data["results"])


@pytest.mark.parametrize("slash", SLASHES)
def test_extra_version(server: Any, slash: str) -> None:
    response = server.get(f"/api/extra/version{slash}")
    assert response.status_code == 200
    data = response.json()
    assert data["result"] == "KoboldCpp"
    assert isinstance(data["version"], str)
    # SillyTavern compares `result` (and some clients `version`) with localeCompare numeric.
    for minimum in ("1.30", "1.35", "1.41", "1.44", "1.48"):
        assert st_flag(data["result"], minimum), minimum
        assert st_flag(data["version"], minimum), (data["version"], minimum)


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("slash", SLASHES)
def test_config_values(server: Any, prefix: str, slash: str) -> None:
    true_max = server.get(f"/api/extra/true_max_context_length{slash}")
    assert true_max.status_code == 200
    assert set(true_max.json()) == {"value"}
    context = true_max.json()["value"]
    assert isinstance(context, int) and not isinstance(context, bool) and context > 0
    # Kobold Lite asks for a preloaded story on connect; there is none
    preload = server.get(f"/api/extra/preloadstory{slash}")
    assert preload.status_code == 200 and preload.json() == {}

    for name in ("max_length", "max_context_length"):
        response = server.get(f"{prefix}/config/{name}{slash}")
        assert response.status_code == 200, name
        data = response.json()
        assert set(data) == {"value"}, data
        assert isinstance(data["value"], int) and not isinstance(data["value"], bool) and data["value"] > 0
    max_context = server.get(f"{prefix}/config/max_context_length").json()["value"]
    max_length = server.get(f"{prefix}/config/max_length").json()["value"]
    assert max_context <= context
    assert max_length < max_context

    soft_prompt = server.get(f"{prefix}/config/soft_prompt{slash}")
    assert soft_prompt.status_code == 200 and soft_prompt.json() == {"value": ""}
    soft_prompts = server.get(f"{prefix}/config/soft_prompts_list{slash}")
    assert soft_prompts.status_code == 200 and soft_prompts.json() == {"values": []}


def test_put_soft_prompt_empty_is_accepted(server: Any) -> None:
    # The Horde worker may PUT /api/latest/config/soft_prompt/ with "".
    response = server.request("PUT", "/api/latest/config/soft_prompt/", json={"value": ""})
    assert response.status_code == 200 and response.json() == {}


def test_perf_reports_the_last_run(server: Any) -> None:
    before = perf(server)
    for key in ("last_process", "last_eval", "last_token_count", "last_seed", "total_gens", "stop_reason",
                "total_img_gens", "queue", "idle", "hordeexitcounter", "uptime", "idletime", "quiet"):
        assert key in before, key
    result = generate(server, **seeded(max_length=9, sampler_seed=987654))
    after = perf(server)
    assert after["total_gens"] == before["total_gens"] + 1
    assert result["completion_tokens"] == 9
    assert after["last_token_count"] == 9
    assert after["last_seed"] == 987654
    assert after["stop_reason"] == 0  # KoboldCpp: 0 = ran out of tokens
    assert after["idle"] == 1 and after["queue"] == 0

    result = generate(server, **seeded(max_length=4, sampler_seed=55))
    again = perf(server)
    assert again["total_gens"] == before["total_gens"] + 2
    assert again["last_token_count"] == result["completion_tokens"] == 4
    assert again["last_seed"] == 55


def test_check_without_running_job(server: Any) -> None:
    for response in (server.get("/api/extra/generate/check"), server.post("/api/extra/generate/check"),
                     server.post("/api/extra/generate/check", json={"genkey": "KCPPNOSUCH"}),
                     server.get("/api/extra/generate/check?genkey=KCPPNOSUCH")):
        assert response.status_code == 200
        assert response.json() == {"results": [{"text": ""}]}


def test_unknown_api_route_and_wrong_method_are_json(server: Any) -> None:
    response = server.post("/api/v1/no_such_route", json={})
    assert response.status_code == 404
    detail = response.json()["detail"]
    assert isinstance(detail["msg"], str) and detail["msg"] and isinstance(detail["type"], str)
    wrong_method = server.get("/api/v1/generate")
    assert wrong_method.status_code == 405
    detail = wrong_method.json()["detail"]
    assert isinstance(detail["msg"], str) and detail["msg"] and isinstance(detail["type"], str)


# --------------------------------------------------------------------------------------
# POST /api/v1/generate
# --------------------------------------------------------------------------------------
def test_generate_shape_and_max_length(server: Any) -> None:
    response = server.post("/api/v1/generate", json={"prompt": PROMPT, "max_length": 7, "ban_eos_token": True})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    data = response.json()
    assert list(data) == ["results"] and len(data["results"]) == 1
    result = data["results"][0]
    assert isinstance(result["text"], str) and result["finish_reason"] == "length"
    assert result["completion_tokens"] == 7
    assert perf(server)["last_token_count"] == 7

    for max_length in (1, 3, 12):
        result = generate(server, **seeded(max_length=max_length, ban_eos_token=False))
        assert result["completion_tokens"] <= max_length
        assert perf(server)["last_token_count"] == result["completion_tokens"]
        if result["finish_reason"] == "length":
            assert result["completion_tokens"] == max_length


def test_generate_text_token_count_matches(server: Any) -> None:
    # Greedy output of a prompt with only ASCII output: the text re-tokenizes to max_length tokens.
    for prompt in ("Once upon a time", "abc", "The quick brown fox", PROMPT):
        result = generate(server, **greedy(prompt=prompt, max_length=10))
        if result["text"].isascii():
            count = server.post("/api/extra/tokencount", json={"prompt": result["text"]}).json()["value"]
            assert count == result["completion_tokens"] == 10
            return
    pytest.fail("no greedy output was pure ASCII")


def test_generate_ignores_unknown_keys(server: Any) -> None:
    sillytavern = {
        "prompt": PROMPT, "use_story": False, "use_memory": False, "use_authors_note": False,
        "use_world_info": False, "max_context_length": 4096, "max_length": 6, "rep_pen": 1.1,
        "rep_pen_range": 1024, "rep_pen_slope": 0.9, "temperature": 0.7, "tfs": 1, "top_a": 0, "top_k": 0,
        "top_p": 0.9, "min_p": 0.05, "typical": 1, "sampler_order": [6, 0, 1, 3, 4, 2, 5], "singleline": False,
        "use_default_badwordsids": False, "mirostat": 0, "mirostat_eta": 0.1, "mirostat_tau": 5, "grammar": "",
        "sampler_seed": 1234, "stop_sequence": ["\nUser:"],
        # KoboldCpp-only keys SillyTavern and Lite send, and plain junk
        "dynatemp_range": 0, "dynatemp_exponent": 1, "smoothing_factor": 0, "dry_multiplier": 0,
        "dry_sequence_breakers": "[\"\\n\", \":\"]", "xtc_threshold": 0.2, "xtc_probability": 0,
        "banned_tokens": [], "render_special": False, "images": [], "no_such_key": {"nested": [1, 2]},
        "another_unknown": "x",
    }
    result = generate(server, **sillytavern)
    assert result["completion_tokens"] <= 6
    tavernai = {"prompt": PROMPT, "use_story": False, "use_memory": False, "use_authors_note": False,
                "use_world_info": False, "max_context_length": 2048, "max_length": 5, "rep_pen": 1.08,
                "rep_pen_range": 1024, "rep_pen_slope": 0.9, "temperature": 0.65, "tfs": 0.9, "top_a": 0,
                "top_k": 0, "top_p": 0.9, "typical": 1, "sampler_order": [6, 0, 1, 2, 3, 4, 5],
                "singleline": True}
    generate(server, **tavernai)
    gui_preset = {"prompt": PROMPT, "use_story": False, "use_memory": False, "use_authors_note": False,
                  "use_world_info": False, "max_context_length": 2048, "max_length": 4}
    generate(server, **gui_preset)


def test_generate_accepts_string_booleans(server: Any) -> None:
    body, text, stops = stop_case(server)
    index, stop = stops[0]
    kept = generate(server, **{**body, "stop_sequence": [stop], "trim_stop": "false", "ban_eos_token": "True",
                               "quiet": "1", "use_story": "False", "singleline": "0",
                               "use_default_badwordsids": "false"})
    assert kept["text"] == text[:index + len(stop)]
    cut = generate(server, **{**body, "stop_sequence": [stop], "trim_stop": "True", "ban_eos_token": "1"})
    assert cut["text"] == text[:index]
    # "1" really turns the EOS ban on: with it, max_length is always reached
    banned = generate(server, **seeded(max_length=30, ban_eos_token="1", sampler_seed=3))
    assert banned["completion_tokens"] == 30 and banned["finish_reason"] == "length"


BAD_VALUES = [
    ("temperature", -0.5),
    ("temperature", "hot"),
    ("top_p", 2),
    ("top_k", "abc"),
    ("top_k", -1),
    ("max_length", 0),
    ("max_length", "ten"),
    ("max_length", 2.5),
    ("max_context_length", 0),
    ("rep_pen_range", -3),
    ("typical", 1.5),
    ("tfs", -1),
    ("n", 6),
    ("sampler_seed", "seed"),
    ("sampler_order", [0, 0, 1, 2, 3, 4]),
    ("sampler_order", [0, 1, 2, 3, 4, 5, 6, 7]),
    ("sampler_order", [6, 9]),
    ("sampler_order", []),
    ("sampler_order", "not a list"),
    ("ban_eos_token", "maybe"),
    ("trim_stop", "perhaps"),
    ("stop_sequence", 5),
    ("stop_sequence", [1, 2]),
    ("prompt", 123),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_generate_rejects_bad_value(server: Any, field: str, value: Any) -> None:
    body = {"prompt": PROMPT, "max_length": 4, field: value}
    response = server.post("/api/v1/generate", json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert set(detail) == {field}, detail
    assert isinstance(detail[field], list) and detail[field]
    assert all(isinstance(message, str) and message for message in detail[field])


def test_generate_lists_every_bad_field_at_once(server: Any) -> None:
    before = perf(server)["total_gens"]
    body = {"temperature": -1, "top_p": 2, "max_length": 0, "top_k": "abc", "sampler_order": [0, 0, 1],
            "unknown_key": "ignored"}
    response = server.post("/api/v1/generate", json=body)
    assert response.status_code == 422
    data = response.json()
    assert set(data) == {"detail"}
    assert set(data["detail"]) == {"prompt", "temperature", "top_p", "max_length", "top_k", "sampler_order"}
    for field, messages in data["detail"].items():
        assert isinstance(messages, list) and messages and all(isinstance(m, str) and m for m in messages), field
    assert perf(server)["total_gens"] == before  # nothing was generated


def test_generate_missing_prompt(server: Any) -> None:
    response = server.post("/api/v1/generate", json={"max_length": 4})
    assert response.status_code == 422
    assert set(response.json()["detail"]) == {"prompt"}


@pytest.mark.parametrize("raw", [b'{"prompt": "x", "max_length": ', b"not json at all", b"[1, 2, 3]", b'"text"',
                                 b"\xff\xfe{}"])
@pytest.mark.parametrize("path", ["/api/v1/generate", "/api/extra/generate/stream", "/api/extra/tokencount"])
def test_malformed_json_is_a_json_error(server: Any, raw: bytes, path: str) -> None:
    response = server.post(path, data=raw, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 600 and response.status_code != 404, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    data = response.json()
    assert set(data) == {"detail"}
    assert isinstance(data["detail"]["msg"], str) and data["detail"]["msg"]
    assert isinstance(data["detail"]["type"], str) and data["detail"]["type"]


def test_generate_without_content_type(server: Any) -> None:
    response = server.post("/api/v1/generate", data=json.dumps({"prompt": PROMPT, "max_length": 3}),
                           headers={"Content-Type": ""})
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["completion_tokens"] <= 3


def test_stop_sequence_trim_default_true_and_false(server: Any) -> None:
    body, text, stops = stop_case(server)
    index, stop = stops[0]
    default = generate(server, **{**body, "stop_sequence": [stop]})
    assert default["text"] == text[:index], (text, stop)
    assert default["finish_reason"] == "stop"
    assert default["completion_tokens"] == index + len(stop)  # bytes = tokens = ASCII characters
    assert perf(server)["stop_reason"] == 2  # KoboldCpp: stopped by a stop string
    trimmed = generate(server, **{**body, "stop_sequence": [stop], "trim_stop": True})
    assert trimmed["text"] == text[:index] and trimmed["finish_reason"] == "stop"
    kept = generate(server, **{**body, "stop_sequence": [stop], "trim_stop": False})
    assert kept["text"] == text[:index + len(stop)] and kept["text"].endswith(stop)
    assert kept["finish_reason"] == "stop"
    # a stop string that never appears changes nothing
    unaffected = generate(server, **{**body, "stop_sequence": ["\u2603never\u2603"]})
    assert unaffected["text"] == text and unaffected["finish_reason"] == "length"


def test_stop_sequence_as_a_plain_string(server: Any) -> None:
    body, text, stops = stop_case(server)
    index, stop = stops[0]
    result = generate(server, **{**body, "stop_sequence": stop})
    assert result["text"] == text[:index] and result["finish_reason"] == "stop"


def _custom_forms(stop: str) -> list[Any]:
    return [[stop], json.dumps([stop]), f"{stop},zzqqzz", f'"{stop}", "zzqqzz"', json.dumps([stop, "zzqqzz"])]


def test_custom_stopping_strings_forms(server: Any) -> None:
    body, text, stops = stop_case(server)
    index, stop = stops[0]
    for form in _custom_forms(stop):
        result = generate(server, **{**body, "custom_stopping_strings": form})
        assert result["text"] == text[:index], form
        assert result["finish_reason"] == "stop", form


def test_custom_stopping_strings_merge_with_stop_sequence(server: Any) -> None:
    body, text, stops = stop_case(server, needed=2)
    (first_index, first), (second_index, second) = stops[0], stops[1]
    assert first_index < second_index
    # the earlier one in either field wins, so both fields are in effect together
    for sequence, custom in (([first], [second]), ([second], [first]), ([second], json.dumps([first])),
                             ([second], f"{first},zzqqzz")):
        result = generate(server, **{**body, "stop_sequence": sequence, "custom_stopping_strings": custom})
        assert result["text"] == text[:first_index], (sequence, custom)
        assert result["finish_reason"] == "stop"
    only_second = generate(server, **{**body, "stop_sequence": [second]})
    assert only_second["text"] == text[:second_index]


def test_same_seed_same_text_different_seed_different_text(server: Any) -> None:
    first = generate(server, **seeded(max_length=24))
    second = generate(server, **seeded(max_length=24))
    assert first["text"] == second["text"]
    others = {generate(server, **seeded(max_length=24, sampler_seed=seed))["text"] for seed in (1, 2, 3)}
    assert first["text"] not in others and len(others) == 3
    # greedy decoding ignores the seed
    assert generate(server, **greedy(sampler_seed=1))["text"] == generate(server, **greedy(sampler_seed=2))["text"]


def test_text_completion_spellings_act_like_the_kobold_names(server: Any) -> None:
    """Each other spelling the route reads does what its Kobold name does: the same reply for the
    same request, and that reply differs from the one without the option."""
    body, text, stops = stop_case(server)
    index, stop = stops[0]
    without_length = {k: v for k, v in body.items() if k != "max_length"}
    for name in ("max_new_tokens", "max_tokens", "n_predict", "num_predict"):
        limited = generate(server, **{**without_length, name: 7})
        assert (limited["completion_tokens"], limited["finish_reason"]) == (7, "length"), name
    for name in ("stopping_strings", "stop", "stop_sequence"):
        stopped = generate(server, **{**body, name: [stop]})
        assert (stopped["text"], stopped["finish_reason"]) == (text[:index], "stop"), name
    other_seed = generate(server, **{**body, "sampler_seed": body["sampler_seed"] + 1})["text"]
    assert other_seed != text
    without_seed = {k: v for k, v in body.items() if k != "sampler_seed"}
    assert generate(server, **{**without_seed, "seed": body["sampler_seed"] + 1})["text"] == other_seed
    plain = generate(server, **greedy(max_length=24))["text"]
    penalised = generate(server, **greedy(max_length=24, rep_pen=3.0, rep_pen_range=64))["text"]
    assert penalised != plain
    for name in ("repetition_penalty", "repeat_penalty"):
        assert generate(server, **greedy(max_length=24, rep_pen_range=64, **{name: 3.0}))["text"] == penalised, name
    assert generate(server, **greedy(max_length=24, rep_pen=3.0, repeat_last_n=64))["text"] == penalised
    assert generate(server, **greedy(max_length=24, rep_pen=3.0, repeat_last_n=1))["text"] != penalised


@pytest.mark.parametrize("seed", [0, 2**31 + 7, 2**53 + 1, 2**62 + 3, 2**63 - 1])
def test_sampler_seed_whole_range(server: Any, seed: int) -> None:
    # United accepts 0..2^64-1; a seed is an integer, not a float.
    first = generate(server, **seeded(max_length=8, sampler_seed=seed))
    assert perf(server)["last_seed"] == seed
    assert generate(server, **seeded(max_length=8, sampler_seed=seed))["text"] == first["text"]


@pytest.mark.parametrize("seed", [2**63, 2**64 - 1, -1])
def test_sampler_seed_upper_range_and_random(server: Any, seed: int) -> None:
    response = server.post("/api/v1/generate", json=seeded(max_length=4, sampler_seed=seed))
    assert response.status_code == 200, response.text


def _most_repeated_ngram(text: str, n: int = 6) -> int:
    grams = [text[i:i + n] for i in range(len(text) - n + 1)]
    return max((grams.count(gram) for gram in set(grams)), default=0)


def test_dry_breaks_loops_with_sillytavern_breakers(server: Any) -> None:
    """DRY with the breakers as SillyTavern sends them (a JSON string): the tiny model's greedy
    output loops, and DRY must visibly break the loop."""
    body = greedy(prompt="abc abc abc abc abc", max_length=60)
    plain = generate(server, **body)["text"]
    dry = generate(server, **body, dry_multiplier=2.0, dry_base=1.75, dry_allowed_length=2,
                   dry_penalty_last_n=0, dry_sequence_breakers='["\\n", ":", "\\"", "*"]')["text"]
    assert _most_repeated_ngram(plain) >= 4, plain  # the premise: without DRY it loops
    assert _most_repeated_ngram(dry) < _most_repeated_ngram(plain), (plain, dry)


@pytest.mark.parametrize("extra", [
    {"mirostat": 2, "mirostat_tau": 1.0, "mirostat_eta": 0.5},
    {"mirostat_mode": 1, "mirostat_tau": 1.0},
    {"xtc_threshold": 0.05, "xtc_probability": 1.0},
    {"dynatemp_range": 0.9, "dynatemp_exponent": 1.0},
    {"smoothing_factor": 2.0},
])
def test_koboldcpp_samplers_take_effect_and_replay(server: Any, extra: dict[str, Any]) -> None:
    """Each KoboldCpp extra sampler changes a seeded sample, and the same seed replays it."""
    common = {"max_length": 24, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "ban_eos_token": True}
    changed = 0
    for seed in range(3):
        plain = generate(server, **seeded(sampler_seed=seed, **common))["text"]
        first = generate(server, **seeded(sampler_seed=seed, **common, **extra))["text"]
        again = generate(server, **seeded(sampler_seed=seed, **common, **extra))["text"]
        assert first == again
        changed += first != plain
    assert changed > 0, f"{extra} made no difference"


def test_banned_strings_are_never_written_nor_streamed(server: Any) -> None:
    """KoboldCpp's phrase bans (SillyTavern's "Banned strings"), in both of its spellings."""
    body = greedy(prompt="abc abc abc abc abc", max_length=40)
    plain = generate(server, **body)["text"]
    phrase = plain[6:10]
    for key, value in (("banned_strings", [phrase.upper()]), ("banned_tokens", json.dumps([phrase]))):
        text = generate(server, **body, **{key: value})["text"]
        assert phrase.lower() not in text.lower() and text[:plain.find(phrase)] == plain[:plain.find(phrase)]
        _, events, _, _ = stream(server, {**body, key: value})
        assert check_kobold_events(events) == text
    openai = server.post("/v1/completions", json={**body, "banned_strings": [phrase]})
    assert openai.status_code == 200 and phrase not in openai.json()["choices"][0]["text"]


def test_sampler_settings_checked_only_when_on(server: Any) -> None:
    """A stale value for a sampler that is off is accepted; the same value with it on is a 422
    naming the field."""
    assert server.post("/api/v1/generate", json=greedy(max_length=2, dry_base=0.5)).status_code == 200
    response = server.post("/api/v1/generate", json=greedy(max_length=2, dry_base=0.5, dry_multiplier=1.0))
    assert response.status_code == 422 and "dry_base" in response.json()["detail"], response.text
    response = server.post("/api/v1/generate", json=greedy(max_length=2, mirostat=3))
    assert response.status_code == 422 and "mirostat" in response.json()["detail"], response.text
    # values that would overflow the maths mid-generation (a 500) or allocate without bound: 422s
    for field, extra in (("smoothing_factor", {"smoothing_factor": 1e39}),
                         ("mirostat_eta", {"mirostat": 1, "mirostat_eta": 1e308}),
                         ("dry_allowed_length", {"dry_multiplier": 0.8, "dry_allowed_length": 10**12}),
                         ("banned_strings", {"banned_strings": ["x" * 1000]})):
        response = server.post("/api/v1/generate", json=greedy(max_length=2, temperature=1, **extra))
        assert response.status_code == 422 and field in response.json()["detail"], response.text


def test_sampler_order_changes_output(server: Any) -> None:
    # With top_p cutting before vs after the temperature, the kept token sets differ.
    common = {"max_length": 24, "temperature": 2.5, "top_p": 0.5, "top_k": 0, "ban_eos_token": True}
    differs = 0
    for seed in range(6):
        default = generate(server, **seeded(sampler_seed=seed, **common, sampler_order=[6, 0, 1, 3, 4, 2, 5]))
        swapped = generate(server, **seeded(sampler_seed=seed, **common, sampler_order=[6, 5, 0, 1, 3, 4, 2]))
        same = generate(server, **seeded(sampler_seed=seed, **common, sampler_order=[6, 0, 1, 3, 4, 2, 5]))
        assert same["text"] == default["text"]
        differs += default["text"] != swapped["text"]
    assert differs > 0
    # a 6-element order without rep_pen (United style) is accepted
    generate(server, **seeded(max_length=3, sampler_order=[0, 1, 2, 3, 4, 5]))
    # KoboldCpp accepts a partial order: samplers left out are not applied (here top_p)
    partial = generate(server, **seeded(sampler_seed=3, **common, sampler_order=[6, 5]))
    without_top_p = generate(server, **seeded(sampler_seed=3, **{**common, "top_p": 1.0}))
    assert partial["text"] == without_top_p["text"]


def test_n_two_results(server: Any) -> None:
    response = server.post("/api/v1/generate", json=seeded(max_length=16, n=2))
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == 2
    for result in results:
        assert isinstance(result["text"], str) and result["finish_reason"] in ("stop", "length")
    assert results[0]["text"] != results[1]["text"]


def test_latest_generate_with_trailing_slash(server: Any) -> None:
    # The Horde worker: POST /api/latest/generate/ with quiet: true
    response = server.post("/api/latest/generate/", json={"prompt": PROMPT, "max_length": 5, "quiet": True,
                                                          "temperature": 0})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 1 and isinstance(results[0]["text"], str)
    same = generate(server, "/api/v1/generate", prompt=PROMPT, max_length=5, temperature=0)
    assert results[0]["text"] == same["text"]


def test_max_context_length_left_truncates(server: Any) -> None:
    prompt = "".join(chr(97 + (i * 7) % 26) for i in range(300))
    result = generate(server, **greedy(prompt=prompt, max_context_length=64, max_length=8))
    kept = result["prompt_tokens"]
    assert 0 < kept <= 64 - 8
    assert result["completion_tokens"] == 8
    # the *end* of the prompt was kept: the continuation equals that of the prompt's tail
    tail = generate(server, **greedy(prompt=prompt[-kept:], max_length=8, max_context_length=2048))
    assert tail["prompt_tokens"] == kept
    assert tail["text"] == result["text"]
    head = generate(server, **greedy(prompt=prompt[:kept], max_length=8, max_context_length=2048))
    assert result["prompt_tokens"] == head["prompt_tokens"]
    untruncated = generate(server, **greedy(prompt=prompt, max_length=8, max_context_length=2048))
    assert untruncated["prompt_tokens"] >= 300


def test_memory_is_prepended(server: Any) -> None:
    with_memory = generate(server, **greedy(prompt="world", memory="Hello ", max_length=8))
    joined = generate(server, **greedy(prompt="Hello world", max_length=8))
    assert with_memory["text"] == joined["text"]


def test_memory_survives_left_truncation(server: Any) -> None:
    """KoboldCpp: memory is always kept; the oldest prompt tokens make room for it."""
    memory = "MEMORY: the hero is Ana.\n"
    prompt = "".join(chr(97 + (i * 7) % 26) for i in range(300))
    result = generate(server, **greedy(prompt=prompt, memory=memory, max_context_length=64, max_length=8))
    assert result["prompt_tokens"] == 64 - 8
    # byte-level tiny model: one token per ASCII character, so the kept text is known exactly
    expected = memory + prompt[-(64 - 8 - len(memory)):]
    same = generate(server, **greedy(prompt=expected, max_length=8, max_context_length=2048))
    assert same["prompt_tokens"] == 64 - 8 and same["text"] == result["text"]
    # a memory longer than the room still leaves the prompt's last few tokens (as KoboldCpp does)
    long_memory = "".join(chr(65 + (i * 5) % 26) for i in range(200))
    result = generate(server, **greedy(prompt="\nQ: and the answer?\nA:", memory=long_memory,
                                       max_context_length=64, max_length=8))
    expected = long_memory[-(64 - 8 - 4):] + "?\nA:"
    same = generate(server, **greedy(prompt=expected, max_length=8, max_context_length=2048))
    assert result["prompt_tokens"] == same["prompt_tokens"] == 64 - 8 and same["text"] == result["text"]


# --------------------------------------------------------------------------------------
# SSE /api/extra/generate/stream
# --------------------------------------------------------------------------------------
def test_stream_format_and_text_equals_generate(server: Any) -> None:
    body = seeded(max_length=40)
    expected = generate(server, **body)
    response, events, leftover, raw = stream(server, body)
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert b"[DONE]" not in raw
    assert leftover.strip() == "", f"undispatched data at the end of the stream: {leftover!r}"
    text = check_kobold_events(events)
    assert text == expected["text"]
    assert events[-1].json()["finish_reason"] == expected["finish_reason"] == "length"
    assert len(events) >= 2  # text events, then the final one


def test_stream_greedy_and_trailing_slash(server: Any) -> None:
    body = greedy(max_length=20)
    expected = generate(server, **body)["text"]
    response = server.post("/api/extra/generate/stream/", json=body, stream=True)
    assert response.status_code == 200
    events, leftover = parse_all(response.iter_content(chunk_size=None))
    assert check_kobold_events(events) == expected and leftover.strip() == ""


def test_stream_stop_string_never_leaks(server: Any) -> None:
    body, text, stops = stop_case(server)
    index, stop = stops[0]
    _, events, leftover, _ = stream(server, {**body, "stop_sequence": [stop]})
    streamed = check_kobold_events(events)
    assert streamed == text[:index], (streamed, text, stop)
    assert stop not in streamed
    assert events[-1].json()["finish_reason"] == "stop"
    # no prefix of the stop string was sent ahead of the match
    if not any(text[:index].endswith(stop[:k]) for k in range(1, len(stop))):
        assert not any(streamed.endswith(stop[:k]) for k in range(1, len(stop)))
    partial = ""
    for event in events:
        partial += event.json()["token"]
        assert stop not in partial
    # trim_stop false streams the stop string itself
    _, kept_events, _, _ = stream(server, {**body, "stop_sequence": [stop], "trim_stop": False})
    assert check_kobold_events(kept_events) == text[:index + len(stop)]


def test_stream_withheld_tail_is_flushed(server: Any) -> None:
    # A stop string whose start matches the end of the text is withheld while streaming
    # and must be released when the generation ends without a match.
    body, text, _ = stop_case(server)
    stop = text[-2:] + "\u2603"
    _, events, _, _ = stream(server, {**body, "stop_sequence": [stop]})
    assert check_kobold_events(events) == text
    assert events[-1].json()["finish_reason"] == "length"


def test_stream_validation_error_is_json(server: Any) -> None:
    response = server.post("/api/extra/generate/stream", json={"prompt": PROMPT, "temperature": -1})
    assert response.status_code == 422
    assert response.headers["Content-Type"].startswith("application/json")
    assert set(response.json()["detail"]) == {"temperature"}


def test_stream_line_separator_survives_sillytavern_parser(server: Any) -> None:
    # Force the bytes of U+2028 (E2 80 A8) to be sampled, so the text contains the character.
    # JS `.` stops at U+2028, so SillyTavern's `data:` regex truncates a raw U+2028 and
    # JSON.parse fails: the server must escape it (or otherwise keep it parseable).
    ids = server.post("/api/extra/tokencount", json={"prompt": "\u2028"}).json()["ids"]
    assert len(ids) == 3
    body = {"prompt": PROMPT, "max_length": 200, "temperature": 50, "top_k": 3, "top_p": 1,
            "sampler_order": [6, 5, 0, 1, 2, 3, 4], "logit_bias": {str(i): 100 for i in ids},
            "ban_eos_token": True}
    for seed in range(5):
        body["sampler_seed"] = seed
        expected = generate(server, **body)["text"]
        if "\u2028" in expected:
            break
    else:
        pytest.fail("could not make the model emit U+2028")
    _, events, leftover, _ = stream(server, body)
    assert check_kobold_events(events) == expected
    assert leftover.strip() == ""


def test_stream_is_incremental(slow_server: Any) -> None:
    before = perf(slow_server)["total_gens"]
    response = requests.post(slow_server.url + "/api/extra/generate/stream", json=long_body(max_length=60),
                             stream=True, timeout=60)
    assert response.status_code == 200
    parser = EventSourceStream()
    events: list[SSEEvent] = []
    reads = 0
    events_at_first = None
    gens_at_first = None
    for chunk in response.iter_content(chunk_size=None):
        reads += 1
        events.extend(parser.feed(chunk))
        if events and events_at_first is None:
            events_at_first = len(events)
            gens_at_first = perf(slow_server)["total_gens"]
    assert events_at_first is not None
    # the first event arrived while the generation was still running ...
    assert gens_at_first == before
    # ... and it was not the whole stream
    assert events_at_first < len(events) and reads > 1
    assert check_kobold_events(events)
    assert wait_idle(slow_server)["total_gens"] == before + 1


# --------------------------------------------------------------------------------------
# abort, check, disconnect, queue
# --------------------------------------------------------------------------------------
def _read_events(parser: EventSourceStream, count: int, chunks: Iterator[bytes]) -> list[SSEEvent]:
    """Read body chunks until ``count`` more events are complete (or the body ends)."""
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
        if len(events) >= count:
            break
    return events


def test_abort_stream_with_empty_body(slow_server: Any) -> None:
    before = perf(slow_server)["total_gens"]
    with requests.Session() as session:
        response = session.post(slow_server.url + "/api/extra/generate/stream", json=long_body(), stream=True,
                                timeout=60)
        assert response.status_code == 200
        parser = EventSourceStream()
        chunks = response.iter_content(chunk_size=None)
        events = _read_events(parser, 2, chunks)
        assert len(events) >= 2
        # SillyTavern: POST /api/extra/abort with no body and no Content-Type, from another connection
        abort = requests.post(slow_server.url + "/api/extra/abort", timeout=30)
        assert "Content-Type" not in abort.request.headers
        assert abort.status_code == 200, abort.text
        assert abort.json() == {"success": "true", "done": "true"}
        for chunk in chunks:
            events.extend(parser.feed(chunk))
        assert parser.close().strip() == ""
    check_kobold_events(events)
    finished = wait_idle(slow_server)
    assert finished["total_gens"] == before + 1
    assert finished["last_token_count"] < LONG // 2
    assert len(events) < LONG // 2
    # nothing is running now: aborting again reports that nothing was aborted
    again = requests.post(slow_server.url + "/api/extra/abort", timeout=30)
    assert again.status_code == 200 and again.json()["success"] == "false"
    assert again.json()["done"] in ("true", "false")


def test_abort_and_check_by_genkey(slow_server: Any) -> None:
    genkey = "KCPPTESTGENKEY"
    outcome: dict[str, Any] = {}

    def run() -> None:
        outcome["response"] = requests.post(slow_server.url + "/api/v1/generate",
                                            json=long_body(genkey=genkey), timeout=60)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        def partial_get() -> str:
            response = slow_server.get(f"/api/extra/generate/check?genkey={genkey}")
            assert response.status_code == 200
            data = response.json()
            assert set(data) == {"results"} and len(data["results"]) == 1
            return data["results"][0]["text"]

        first = poll(partial_get, "partial text from generate/check (GET)")
        check_post = slow_server.post("/api/extra/generate/check", json={"genkey": genkey})
        assert check_post.status_code == 200
        second = check_post.json()["results"][0]["text"]
        assert second.startswith(first) and second
        other = slow_server.post("/api/extra/generate/check", json={"genkey": "KCPPOTHERKEY"})
        assert other.json() == {"results": [{"text": ""}]}
        assert thread.is_alive(), "the generation finished before it could be aborted"

        wrong = slow_server.post("/api/extra/abort", json={"genkey": "KCPPOTHERKEY"})
        assert wrong.status_code == 200 and wrong.json()["success"] == "false"
        assert thread.is_alive()
        abort = slow_server.post("/api/extra/abort", json={"genkey": genkey})
        assert abort.status_code == 200 and abort.json() == {"success": "true", "done": "true"}
    finally:
        if thread.is_alive():
            requests.post(slow_server.url + "/api/extra/abort", json={"genkey": genkey}, timeout=30)
        thread.join(timeout=30)
    response = outcome["response"]
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["completion_tokens"] < LONG // 2
    assert result["text"].startswith(second)
    full = generate(slow_server, **long_body(max_length=result["completion_tokens"]))
    assert full["text"] == result["text"]


def _post_from(server: LiveServer, address: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """POST from a chosen loopback address (all of 127/8 is this machine), as another client would."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=60,
                                            source_address=(address, 0))
    try:
        connection.request("POST", path, body=json.dumps(body) if body is not None else None,
                           headers={"Content-Type": "application/json"} if body is not None else {})
        response = connection.getresponse()
        assert response.status == 200
        return json.loads(response.read())
    finally:
        connection.close()


def test_abort_and_check_without_genkey_reach_only_the_same_client(slow_server: Any) -> None:
    """SillyTavern aborts with no genkey: that must stop its own generation, not another user's."""
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: outcome.update(
        result=_post_from(slow_server, "127.0.0.2", "/api/v1/generate", long_body())["results"][0]))
    thread.start()
    try:
        poll(lambda: _post_from(slow_server, "127.0.0.2", "/api/extra/generate/check", {})["results"][0]["text"],
             "partial text for the generating client")
        assert _post_from(slow_server, "127.0.0.1", "/api/extra/generate/check", {}) == {"results": [{"text": ""}]}
        assert _post_from(slow_server, "127.0.0.1", "/api/extra/abort")["success"] == "false"
        assert thread.is_alive(), "another client's abort stopped the generation"
        assert _post_from(slow_server, "127.0.0.2", "/api/extra/abort")["success"] == "true"
    finally:
        thread.join(timeout=60)
    assert outcome["result"]["completion_tokens"] < LONG // 2


def test_client_disconnect_aborts_generation(slow_server: Any) -> None:
    before = perf(slow_server)["total_gens"]
    session = requests.Session()
    response = session.post(slow_server.url + "/api/extra/generate/stream", json=long_body(), stream=True,
                            timeout=60)
    assert response.status_code == 200
    parser = EventSourceStream()
    events = _read_events(parser, 1, response.iter_content(chunk_size=None))
    assert events
    response.close()
    session.close()
    after = poll(lambda: (lambda p: p if p["total_gens"] > before else None)(perf(slow_server)),
                 "the abandoned generation to end")
    assert after["total_gens"] == before + 1
    assert after["last_token_count"] < LONG // 2, after


def test_client_disconnect_aborts_non_streaming_generation(slow_server: Any) -> None:
    # SillyTavern's non-streaming stop button just drops the fetch: no abort call follows.
    before = perf(slow_server)["total_gens"]
    payload = json.dumps(long_body()).encode()
    host, port = slow_server.url.rsplit("/", 1)[-1].split(":")
    connection = socket.create_connection((host, int(port)), timeout=30)
    try:
        connection.sendall(b"POST /api/v1/generate HTTP/1.1\r\nHost: " + host.encode()
                           + b"\r\nContent-Type: application/json\r\nContent-Length: "
                           + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        poll(lambda: perf(slow_server)["idle"] == 0, "the generation to start")
    finally:
        connection.close()
    after = poll(lambda: (lambda p: p if p["total_gens"] > before else None)(perf(slow_server)),
                 "the abandoned generation to end")
    assert after["total_gens"] == before + 1
    assert after["last_token_count"] < LONG // 2, after


def test_queue_overflow_is_503(start_server: Callable[..., Any], tiny_model_dir: Path, test_settings: Any) -> None:
    engine = throttle(make_engine(tiny_model_dir, queue_size=1))
    threads: list[threading.Thread] = []
    sessions: list[requests.Session] = []
    try:
        server = start_server(engine, test_settings)
        # A: a long stream, running once its first event arrives
        session = requests.Session()
        sessions.append(session)
        running = session.post(server.url + "/api/extra/generate/stream", json=long_body(genkey="KCPPRUNNING"),
                               stream=True, timeout=60)
        assert running.status_code == 200
        parser = EventSourceStream()
        chunks = running.iter_content(chunk_size=None)
        assert _read_events(parser, 1, chunks)

        # B: queued behind it
        queued: dict[str, Any] = {}

        def run_queued() -> None:
            queued["response"] = requests.post(server.url + "/api/v1/generate",
                                               json=long_body(genkey="KCPPQUEUED"), timeout=60)

        thread = threading.Thread(target=run_queued)
        threads.append(thread)
        thread.start()
        poll(lambda: perf(server)["queue"] == 1, "the second request to be queued")

        # C: no room left
        for path in ("/api/v1/generate", "/api/extra/generate/stream", "/api/latest/generate/"):
            response = server.post(path, json={"prompt": PROMPT, "max_length": 4})
            assert response.status_code == 503, (path, response.text)
            assert response.headers["Content-Type"].startswith("application/json")
            data = response.json()
            assert set(data) == {"detail"}
            assert data["detail"]["type"] == "service_unavailable"
            assert isinstance(data["detail"]["msg"], str) and data["detail"]["msg"]

        # a queued request can be aborted by genkey; it then ends as soon as it starts
        abort_queued = server.post("/api/extra/abort", json={"genkey": "KCPPQUEUED"})
        assert abort_queued.json() == {"success": "true", "done": "true"}
        abort_running = server.post("/api/extra/abort")
        assert abort_running.json() == {"success": "true", "done": "true"}
        events = []
        for chunk in chunks:
            events.extend(parser.feed(chunk))
        assert events and events[-1].json()["finish_reason"] in ("stop", "length")  # the stream ended properly
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert queued["response"].status_code == 200
        assert queued["response"].json()["results"][0]["completion_tokens"] == 0
        # and there is room again
        assert generate(server, prompt=PROMPT, max_length=2)["completion_tokens"] <= 2
    finally:
        engine.shutdown()
        for session in sessions:
            session.close()
        for thread in threads:
            thread.join(timeout=10)



def test_more_generations_than_the_queue_holds_run_in_waves(
        start_server: Callable[..., Any], tiny_model_dir: Path, test_settings: Any, server: Any) -> None:
    """An idle server whose queue holds 3: a request for more generations at once (Kobold ``n``,
    OpenAI prompts x ``n``, plain and streamed) queues them in waves and gets every result, the
    same ones a server with a larger queue gives (seeded, so each result is reproducible)."""
    engine = make_engine(tiny_model_dir, queue_size=3)
    try:
        small = start_server(engine, test_settings)
        body = {"prompt": PROMPT, "max_length": 6, "n": 4, "sampler_seed": 11, "temperature": 1.0}
        waved = small.post("/api/v1/generate", json=body)
        assert waved.status_code == 200, waved.text
        at_once = server.post("/api/v1/generate", json=body)  # the shared server queues 16
        assert [r["text"] for r in waved.json()["results"]] == [r["text"] for r in at_once.json()["results"]]

        completion = {"prompt": ["Once upon", "The sea"], "n": 2, "max_tokens": 4, "seed": 3, "temperature": 1.0}
        plain = small.post("/v1/completions", json=completion)
        assert plain.status_code == 200, plain.text
        expected = [c["text"] for c in server.post("/v1/completions", json=completion).json()["choices"]]
        assert [c["text"] for c in plain.json()["choices"]] == expected
        streamed = small.post("/v1/completions", json={**completion, "stream": True}, stream=True)
        texts: dict[int, str] = {}
        events, _ = parse_all(streamed.iter_content(chunk_size=None))
        assert events[-1].data == "[DONE]"
        for event in events[:-1]:
            choice = event.json()["choices"][0]
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        assert [texts[index] for index in range(4)] == expected
        assert engine.queued == 0
    finally:
        engine.shutdown()


def test_concurrent_requests_match_solo_runs(start_server: Callable[..., Any], tiny_model_dir: Path,
                                            test_settings: Any) -> None:
    # The server's default engine batches concurrent requests; a seeded or greedy request must
    # give the same text whether it ran alone or next to others (different prompt lengths).
    engine = make_engine(tiny_model_dir, max_batch_size=4)
    try:
        server = start_server(engine, test_settings)
        bodies = [seeded(prompt="Hi", max_length=90, sampler_seed=11),
                  seeded(prompt="A much longer prompt than the others, " * 3, max_length=70, sampler_seed=22),
                  greedy(prompt="Medium sized prompt", max_length=80),
                  seeded(prompt=PROMPT, max_length=60, sampler_seed=33, stop_sequence=["\u2603\u2603"])]
        solo = [generate(server, **body)["text"] for body in bodies]
        results: list[Any] = [None] * len(bodies)

        def run(index: int) -> None:
            if index % 2:
                _, events, _, _ = stream(server, bodies[index])
                results[index] = check_kobold_events(events)
            else:
                results[index] = generate(server, **bodies[index])["text"]

        threads = [threading.Thread(target=run, args=(index,)) for index in range(len(bodies))]
        with ModelProbe(engine) as probe:  # the first is held in its prefill until the others queue
            submit_together(probe, threads[0].start, [thread.start for thread in threads[1:]])
            for thread in threads:
                thread.join(timeout=120)
            assert probe.max_rows == 4  # the four really ran in one batch
        assert results == solo
    finally:
        engine.shutdown()


# --------------------------------------------------------------------------------------
# tokenizer routes
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/api/extra/tokencount", "/api/extra/tokenize", "/api/extra/tokencount/"])
def test_tokencount(server: Any, path: str) -> None:
    for text in ("Hello world", "h\u00e9llo \u2603 \U0001F600", ""):
        response = server.post(path, json={"prompt": text})
        assert response.status_code == 200, response.text
        data = response.json()
        assert set(data) >= {"value", "ids"}
        assert isinstance(data["value"], int) and data["ids"] == [int(i) for i in data["ids"]]
        assert data["value"] == len(data["ids"])
        assert data["value"] == len(text.encode("utf-8"))  # the test model is byte-level
        back = server.post("/api/extra/detokenize", json={"ids": data["ids"]})
        assert back.status_code == 200
        assert back.json() == {"result": text, "success": True}


def test_tokencount_matches_prompt_tokens(server: Any) -> None:
    count = server.post("/api/extra/tokencount", json={"prompt": "Once upon a time"}).json()["value"]
    result = generate(server, prompt="Once upon a time", max_length=2)
    assert result["prompt_tokens"] == count


# --------------------------------------------------------------------------------------
# API key and CORS
# --------------------------------------------------------------------------------------
PROBES = ["/api/v1/model", "/api/latest/model", "/api/v1/info/version", "/api/extra/version", "/api/v1/model/"]


def test_api_key(start_server: Callable[..., Any], tiny_engine: Any, test_settings: Any) -> None:
    server = start_server(tiny_engine, replace(test_settings, api_key="secret"))
    body = {"prompt": PROMPT, "max_length": 3}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}):
        response = server.post("/api/v1/generate", json=body, headers=headers)
        assert response.status_code == 401, headers
        data = response.json()
        assert set(data) == {"detail"}
        assert data["detail"]["error"] == "Unauthorized" and data["detail"]["type"] == "unauthorized"
        assert isinstance(data["detail"]["msg"], str) and data["detail"]["msg"]
    ok = server.post("/api/v1/generate", json=body, headers={"Authorization": "Bearer secret"})
    assert ok.status_code == 200 and len(ok.json()["results"]) == 1
    for path in ("/api/extra/generate/stream", "/api/extra/tokencount", "/api/extra/abort"):
        assert server.post(path, json=body).status_code == 401, path
    assert server.get("/api/v1/config/max_length").status_code == 401
    assert server.get("/api/v1/config/max_length",
                      headers={"Authorization": "Bearer secret"}).status_code == 200
    # SillyTavern's status probe sends no auth header and must still see the server
    for path in PROBES:
        response = server.get(path)
        assert response.status_code == 200, path
    assert server.get("/api/v1/model").json()["result"] != "ReadOnly"
    assert server.get("/api/extra/version").json()["result"] == "KoboldCpp"


def test_api_key_with_closed_probes(start_server: Callable[..., Any], tiny_engine: Any,
                                    test_settings: Any) -> None:
    server = start_server(tiny_engine, replace(test_settings, api_key="secret", open_probes=False))
    for path in PROBES:
        denied = server.get(path)
        assert denied.status_code == 401, path
        assert denied.json()["detail"]["type"] == "unauthorized"
        assert server.get(path, headers={"Authorization": "Bearer secret"}).status_code == 200, path


def test_cors_headers_and_preflight(server: Any) -> None:
    origin = {"Origin": "http://localhost:8000"}
    response = server.get("/api/v1/model", headers=origin)
    assert response.headers.get("Access-Control-Allow-Origin") in ("*", "http://localhost:8000")
    generated = server.post("/api/v1/generate", json={"prompt": PROMPT, "max_length": 2}, headers=origin)
    assert generated.headers.get("Access-Control-Allow-Origin") in ("*", "http://localhost:8000")
    for path in ("/api/v1/generate", "/api/extra/generate/stream", "/api/extra/abort", "/api/v1/model"):
        preflight = server.request("OPTIONS", path, headers={
            **origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 200, path
        assert preflight.headers.get("Access-Control-Allow-Origin") in ("*", "http://localhost:8000")
        methods = preflight.headers.get("Access-Control-Allow-Methods", "")
        assert "POST" in methods or methods == "*"
        allowed = preflight.headers.get("Access-Control-Allow-Headers", "").lower()
        assert allowed == "*" or "content-type" in allowed


def _allows_header(allowed: str, name: str) -> bool:
    names = [item.strip().lower() for item in allowed.split(",")]
    return name.lower() in names


def test_cors_preflight_with_api_key_allows_authorization(start_server: Callable[..., Any], tiny_engine: Any,
                                                          test_settings: Any) -> None:
    # A browser client on another origin (e.g. Kobold Lite) sending the key: the preflight carries
    # no key and must pass, and it must allow the Authorization header. Per the Fetch standard
    # `Authorization` is never covered by the `*` wildcard; it has to be listed (or echoed).
    server = start_server(tiny_engine, replace(test_settings, api_key="secret"))
    preflight = server.request("OPTIONS", "/api/v1/generate", headers={
        "Origin": "http://localhost:8000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200
    assert preflight.headers.get("Access-Control-Allow-Origin") in ("*", "http://localhost:8000")
    allowed = preflight.headers.get("Access-Control-Allow-Headers", "")
    assert _allows_header(allowed, "authorization"), f"Access-Control-Allow-Headers: {allowed!r}"


# --------------------------------------------------------------------------------------
# OpenAPI document and docs page
# --------------------------------------------------------------------------------------
_CONVERTER = re.compile(r"<(?:[^<>]*:)?([^<>:]+)>")


def _documented_rules(app: Any) -> set[tuple[str, str]]:
    rules = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or not rule.rule.startswith(("/api", "/v1", "/props", "/.well-known", "/health",
                                                                           "/metrics")):
            continue
        path = _CONVERTER.sub(r"{\1}", rule.rule)
        path = path.rstrip("/") or "/"
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            rules.add((path, method.lower()))
    return rules


def test_converter_regex() -> None:
    assert _CONVERTER.sub(r"{\1}", "/a/<int(signed=True):index>/<name>/<path:rest>") == "/a/{index}/{name}/{rest}"


def test_openapi_matches_url_map(server: Any) -> None:
    response = server.get("/api/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    assert isinstance(document["info"]["title"], str)
    documented = {(path.rstrip("/") or "/", method) for path, operations in document["paths"].items()
                  for method in operations if method in ("get", "post", "put", "patch", "delete")}
    actual = _documented_rules(server.app)
    assert actual, "the app has no API routes?"
    assert ("/api/v1/generate", "post") in actual
    missing = actual - documented
    assert not missing, f"routes missing from /api/openapi.json: {sorted(missing)}"
    extra = documented - actual
    assert not extra, f"documented routes that do not exist: {sorted(extra)}"
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert "responses" in operation, (path, method)
            for parameter in re.findall(r"{([^{}]+)}", path):
                names = [p["name"] for p in operation.get("parameters", []) if p.get("in") == "path"]
                assert parameter in names, (path, method, parameter)


def test_docs_page_is_html(server: Any) -> None:
    for path in ("/api/docs", "/api/docs/"):
        response = server.get(path)
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/html")
        assert "<html" in response.text.lower() and "/api/v1/generate" in response.text
