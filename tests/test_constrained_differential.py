"""Differential test of constrained generation: random grammars and JSON schemas, generated on
the tiny model under varied samplers, every reply judged by recognisers of our own
(``gbnf_check.py``, ``json_check.py`` + ``jsonschema``), never by the engine's own matcher.

Bounded (a fixed, derandomized set of examples) so the suite stays fast; ``python
benchmarks/constrained_fuzz.py --cases N`` runs the same cases longer and prints the counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings

from constrained_cases import grammar_case, grammars, json_schemas, run_case, schema_case
from gbnf_check import Alt, Cls, Lit, Recogniser, Ref, Rep, Seq, render
from json_check import COMPLETE, INVALID, PREFIX, json_state
from sse_client import parse_all

#: Examples per property: each runs four to six generations at once.
EXAMPLES = 100
BOUNDED = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[Any]:
    from conftest import make_engine

    engine = make_engine(tiny_model_dir, max_batch_size=8, prefix_cache_mb=0)
    yield engine
    engine.shutdown()


def test_the_recognisers_themselves() -> None:
    """The judges must be able to say no, or the differential test could not fail."""
    grammar = {"root": Seq((Alt((Lit("yes"), Lit("no"))), Lit(" "), Ref("colour"))),
               "colour": Alt((Lit("red"), Rep(Cls((("a", "c"),)), "+")))}
    assert render(grammar) == 'root ::= ("yes" | "no") " " colour\ncolour ::= "red" | [a-c]+\n'
    judge = Recogniser(grammar).judge
    assert [judge(t) for t in ("yes red", "no abca", "ye", "no ", "yes re", "yes x", "yesred", "no reda")] == \
        ["complete", "complete", "prefix", "prefix", "prefix", "invalid", "invalid", "invalid"]
    assert [json_state(t) for t in ('{"a":[1,2.5e3,true,null]}', '{"a":"x\\n', '{"a":"x\n"}', '{"a":1}x', '',
                                    '{"a":01}', '[1,]', '"\\q"', '-')] == \
        [COMPLETE, PREFIX, INVALID, INVALID, PREFIX, INVALID, INVALID, INVALID, PREFIX]


@BOUNDED
@given(grammar=grammars())
def test_random_grammars_hold_under_every_setting(engine: Any, grammar: dict) -> None:
    _, failures = run_case(engine, grammar_case(grammar), seed=len(render(grammar)))
    assert not failures, "\n".join(failures)


@BOUNDED
@given(schema=json_schemas())
def test_random_json_schemas_hold_under_every_setting(engine: Any, schema: dict) -> None:
    _, failures = run_case(engine, schema_case(schema), seed=len(str(schema)))
    assert not failures, "\n".join(failures)


@settings(max_examples=8, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(grammar=grammars())
def test_random_grammars_over_http_with_n_and_streaming(server: Any, grammar: dict) -> None:
    """The same judges over the Kobold routes: ``n`` = 3 results of one request, and a stream
    whose pieces join to the final text."""
    text, judge = render(grammar), Recogniser(grammar).judge
    body = {"prompt": "Write:", "max_length": 24, "grammar": text, "temperature": 1.0, "sampler_seed": 7}
    response = server.post("/api/v1/generate", json={**body, "n": 3})
    assert response.status_code == 200, response.text
    for result in response.json()["results"]:
        expected = ("complete",) if result["finish_reason"] == "stop" else ("complete", "prefix")
        assert judge(result["text"].rstrip("\ufffd")) in expected, (result, text)
    response = server.post("/api/extra/generate/stream", json=body, stream=True)
    payloads = [event.json() for event in parse_all(response.iter_content(chunk_size=None))[0]]
    streamed, final = "".join(payload["token"] for payload in payloads), payloads[-1]
    expected = ("complete",) if final["finish_reason"] == "stop" else ("complete", "prefix")
    assert judge(streamed.rstrip("\ufffd")) in expected, (streamed, final, text)
