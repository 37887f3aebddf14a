"""Constrained output on the real default model, whose GGUF-converted tokenizer (byte-level
tokens behind ``Sequence[ByteFallback, Fuse, Replace, ByteLevel]``) the tiny model's does not
resemble: grammars users send, JSON on every route, stop strings and EOS bans beside a grammar.

Every reply is checked by means independent of the engine: regular expressions, ``jsonschema``
and the strict JSON reader in ``json_check.py``. Several seeds each (``n`` results of one
request get seed, seed + 1, ...), decoded as one batch so the module stays quick.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import jsonschema
import ollama
import openai
import pytest

from json_check import COMPLETE, check_constrained_json, json_state

pytestmark = pytest.mark.e2e

CHATML_QUESTION = ("<|im_start|>user\nIs the sky blue? Answer and name a colour.<|im_end|>\n"
                   "<|im_start|>assistant\n")
#: The grammar SillyTavern's Grammar field sends in spirit: two lines, literals and a space.
TWO_LINE_GRAMMAR = 'root ::= answer " " colour\nanswer ::= "yes" | "no"\ncolour ::= "red" | "green" | "blue"\n'
PERSON_PROMPT = "Give me a JSON object describing a person with a multi-line biography."
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "biography": {"type": "string"}}, "required": ["name", "age", "biography"], "additionalProperties": False}
#: Seeds per case: ``n`` = 4 results of each of three requests run at once.
SEED_STARTS, N = (0, 4, 8), 4


@pytest.fixture(scope="module")
def server(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from conftest import close_server, make_engine, module_server

    engine = make_engine(default_model_dir, max_batch_size=8)
    live = module_server(engine, tmp_path_factory.mktemp("constrained"))
    yield live
    close_server(live)
    engine.shutdown()


def twelve(run: Callable[[int], list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """``run(seed)`` for each seed start at once; the (text, finish_reason) of all 12 results."""
    with ThreadPoolExecutor(len(SEED_STARTS)) as pool:
        results = [pair for batch in pool.map(run, SEED_STARTS) for pair in batch]
    assert len(results) == len(SEED_STARTS) * N
    return results


def kobold(server: Any, **body: Any) -> Callable[[int], list[tuple[str, str]]]:
    def run(seed: int) -> list[tuple[str, str]]:
        response = server.post("/api/v1/generate", json={**body, "n": N, "sampler_seed": seed})
        assert response.status_code == 200, response.text
        return [(result["text"], result["finish_reason"]) for result in response.json()["results"]]
    return run


def test_two_line_grammar_on_twelve_seeds(server: Any) -> None:
    """Was a 500 on every seed: llguidance read ``Ġ`` as a letter, so after "yes" the mask
    allowed tokens the matcher then refused."""
    results = twelve(kobold(server, prompt=CHATML_QUESTION, max_length=12, grammar=TWO_LINE_GRAMMAR,
                            temperature=0.7))
    for text, finish in results:
        assert re.fullmatch(r"(yes|no) (red|green|blue)", text) and finish == "stop", (text, finish)


def test_character_class_with_spaces(server: Any) -> None:
    grammar = 'root ::= [a-zA-Z ,]+ "."\n'
    results = twelve(kobold(server, prompt=CHATML_QUESTION, max_length=24, grammar=grammar, temperature=1.0))
    for text, finish in results:
        pattern = r"[a-zA-Z ,]+\." if finish == "stop" else r"[a-zA-Z ,]+"
        assert re.fullmatch(pattern, text), (text, finish)
    assert any(" " in text for text, _ in results)


def test_grammar_with_ban_eos_token_ends_where_the_grammar_ends(server: Any) -> None:
    results = twelve(kobold(server, prompt=CHATML_QUESTION, max_length=12, grammar='root ::= "yes" | "no"',
                            ban_eos_token=True, temperature=1.0))
    assert all(text in ("yes", "no") and finish == "stop" for text, finish in results), results


def test_openai_json_object_parses_on_twelve_seeds(server: Any) -> None:
    """Was 11 failures of 12, three with raw newlines inside strings (``Ċ`` passed as a letter)."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)

    def run(seed: int) -> list[tuple[str, str]]:
        reply = client.chat.completions.create(
            model="any", messages=[{"role": "user", "content": PERSON_PROMPT}], max_tokens=150, temperature=1.0,
            seed=seed, n=N, response_format={"type": "json_object"})
        return [(choice.message.content, choice.finish_reason) for choice in reply.choices]

    results = twelve(run)
    for text, finish in results:
        value = check_constrained_json(text, finish)
        assert value is None or isinstance(value, dict)
    assert any(finish == "stop" for _, finish in results)


def test_openai_json_schema_and_tools(server: Any) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)

    def run(seed: int) -> list[tuple[str, str]]:
        reply = client.chat.completions.create(
            model="any", messages=[{"role": "user", "content": PERSON_PROMPT}], max_tokens=120, temperature=1.0,
            seed=seed, n=N, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
        return [(choice.message.content, choice.finish_reason) for choice in reply.choices]

    for text, finish in twelve(run):
        value = check_constrained_json(text, finish)
        if value is not None:
            jsonschema.validate(value, PERSON)
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
    reply = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "What is the weather in Oslo?"}], tools=[weather],
        tool_choice="required", max_tokens=80, temperature=1.0, seed=5, n=N)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls", choice
        arguments = choice.message.tool_calls[0].function.arguments
        assert json_state(arguments) == COMPLETE, arguments
        jsonschema.validate(json.loads(arguments), weather["function"]["parameters"])


def test_ollama_format_schema_and_json(server: Any) -> None:
    with ollama.Client(host=server.url, timeout=120) as client:
        for form, seed in ((PERSON, 1), ("json", 2), (PERSON, 3)):
            reply = client.chat(model="any", messages=[{"role": "user", "content": PERSON_PROMPT}], format=form,
                                options={"seed": seed, "temperature": 1.0, "num_predict": 120})
            finish = "length" if reply.done_reason == "length" else "stop"
            value = check_constrained_json(reply.message.content, finish)
            if value is not None and form == PERSON:
                jsonschema.validate(value, PERSON)


def test_json_beside_stop_strings(server: Any) -> None:
    """SillyTavern adds stop strings to every request. Under a grammar a stop string ends the
    reply only where the grammar could end it, so JSON is never cut inside: ``":`` follows every
    key and is passed over; ``}`` kept (trim_stop false) ends the reply at the closing brace."""
    schema = json.dumps(PERSON)
    for stops, trim in ((['":', "\nUser:"], True), (["}"], False)):
        results = twelve(kobold(server, prompt=CHATML_QUESTION.replace("Is the sky blue? Answer and name a colour.",
                                                                       PERSON_PROMPT),
                                max_length=120, grammar=schema, stop_sequence=stops, trim_stop=trim,
                                temperature=1.0))
        for text, finish in results:
            value = check_constrained_json(text, finish)
            if value is not None:
                jsonschema.validate(value, PERSON)
        assert any(finish == "stop" for _, finish in results)
