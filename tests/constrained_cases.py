"""Random grammars and JSON schemas, constrained generation under varied samplers, and the
verdict of independent recognisers: the differential test's cases, shared with the longer run
in ``benchmarks/constrained_fuzz.py``.

A case is one grammar (or schema) run under several settings at once on an engine, so rows
decode together in one batch: sampled and greedy, top-k, a stop string the grammar writes, a
phrase ban on one of its literals, an EOS ban. Each result must be complete where the
generation says it ended naturally (EOS, a stop string), a prefix where it was cut by length,
and may end early ("grammar": no allowed token is left) only where a ban took tokens away.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import jsonschema
from hypothesis import strategies as st

from gbnf_check import Alt, Cls, Grammar, Lit, Node, Recogniser, Ref, Rep, Seq, render
from json_check import COMPLETE, PREFIX, json_state
from kobold_api.engine.constraints import Constraint
from kobold_api.engine.engine import Engine
from kobold_api.engine.generation import GenerationRequest, GenerationResult
from kobold_api.engine.sampling import SamplingParams

#: Characters of literals: letters, digits, spaces and punctuation, escapes, and characters of
#: two, three and four UTF-8 bytes (which span several byte-level tokens).
LITERAL_CHARS = "abcxyzXYZ019 .,!?:;'\"-_()\\\n\té日→🎉"
#: Ranges of character classes (GBNF's escapes inside classes differ between dialects, so the
#: class characters need none).
CLASS_RANGES = [("a", "f"), ("a", "z"), ("0", "9"), ("A", "Z"), (" ", " "), (".", "."), (",", ","), ("é", "ü"),
                ("日", "本"), ("x", "x"), ("!", "!")]
MAX_TOKENS = 32


def nullable(node: Node, grammar: Grammar) -> bool:
    if isinstance(node, Lit):
        return not node.text
    if isinstance(node, Cls):
        return False
    if isinstance(node, Ref):
        return nullable(grammar[node.name], grammar)
    if isinstance(node, Seq):
        return all(nullable(item, grammar) for item in node.items)
    if isinstance(node, Alt):
        return any(nullable(option, grammar) for option in node.options)
    return node.kind != "+" or nullable(node.item, grammar)


@st.composite
def grammars(draw: st.DrawFn) -> Grammar:
    """One to three rules; a rule refers only to later ones."""
    count = draw(st.integers(1, 3))
    names = ["root", *[f"r{index}" for index in range(1, count)]]
    rules: Grammar = {}
    for position in range(count - 1, -1, -1):
        later = names[position + 1:]
        rules[names[position]] = draw(_node(rules, later, depth=draw(st.integers(1, 3))))
    return {name: rules[name] for name in names}


def _node(rules: Grammar, refs: list[str], depth: int) -> st.SearchStrategy[Node]:
    leaf = st.one_of(
        st.text(alphabet=LITERAL_CHARS, min_size=1, max_size=4).map(Lit),
        st.builds(Cls, st.lists(st.sampled_from(CLASS_RANGES), min_size=1, max_size=3, unique=True).map(tuple),
                  st.sampled_from([False, False, False, True])),
        *([st.sampled_from(refs).map(Ref)] if refs else []),
    )
    if depth <= 0:
        return leaf
    inner = _node(rules, refs, depth - 1)
    return st.one_of(
        leaf,
        st.lists(inner, min_size=2, max_size=3).map(lambda items: Seq(tuple(items))),
        st.lists(inner, min_size=2, max_size=3).map(lambda options: Alt(tuple(options))),
        st.tuples(inner, st.sampled_from("?*+")).map(
            lambda pair: pair[0] if nullable(pair[0], rules) else Rep(pair[0], pair[1])),
    )


@st.composite
def json_schemas(draw: st.DrawFn, depth: int = 2) -> dict[str, Any]:
    """Small schemas of the kinds clients send: objects of typed properties, enums, bounded
    strings, numbers and arrays, nested objects, anyOf."""
    scalar = st.one_of(
        st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 12)),
        st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
                  st.integers(-50, 50), st.integers(0, 1000)),
        st.just({"type": "number"}),
        st.just({"type": "boolean"}),
        st.just({"type": "null"}),
        st.lists(st.one_of(st.text(alphabet=LITERAL_CHARS, max_size=5), st.integers(-9, 9)), min_size=1,
                 max_size=4, unique=True).map(lambda values: {"enum": values}),
        st.text(alphabet=LITERAL_CHARS, max_size=6).map(lambda value: {"const": value}),
    )
    if depth > 0:
        inner = json_schemas(depth - 1)
        value = st.one_of(scalar, inner,
                          st.builds(lambda items, n: {"type": "array", "items": items, "maxItems": n}, scalar,
                                    st.integers(0, 3)),
                          st.lists(scalar, min_size=2, max_size=3).map(lambda options: {"anyOf": options}))
    else:
        value = scalar
    names = draw(st.lists(st.text(alphabet="abcxyz_é", min_size=1, max_size=6), min_size=1, max_size=4, unique=True))
    properties = {name: draw(value) for name in names}
    required = [name for name in names if draw(st.booleans())]
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


@dataclass
class Case:
    """One constraint with the checks its replies get."""

    constraint: Constraint
    judge: Any  # text -> "complete" | "prefix" | "invalid"
    literals: list[str] = field(default_factory=list)
    schema: dict[str, Any] | None = None
    description: str = ""


def grammar_case(grammar: Grammar) -> Case:
    text = render(grammar)
    literals = sorted({node.text for node in _walk(grammar) if isinstance(node, Lit) and node.text.strip()})
    return Case(Constraint.from_grammar(text), Recogniser(grammar).judge, literals, description=text)


def schema_case(schema: dict[str, Any]) -> Case:
    def judge(text: str) -> str:
        state = json_state(text)
        if state == COMPLETE:
            try:
                jsonschema.validate(json.loads(text), schema)
            except jsonschema.ValidationError:
                return "invalid"
        return state

    return Case(Constraint.from_json_schema(schema), judge, schema=schema, description=json.dumps(schema))


def _walk(grammar: Grammar) -> list[Node]:
    found: list[Node] = []

    def visit(node: Node) -> None:
        found.append(node)
        for child in getattr(node, "items", ()) or getattr(node, "options", ()):
            visit(child)
        if isinstance(node, Rep):
            visit(node.item)

    for body in grammar.values():
        visit(body)
    return found


def settings_for(case: Case, seed: int) -> list[tuple[str, GenerationRequest]]:
    """The variants a case runs under (named, for failure messages)."""
    def request(**kwargs: Any) -> GenerationRequest:
        sampling = kwargs.pop("sampling")
        return GenerationRequest(prompt="Write:", max_new_tokens=MAX_TOKENS, constraint=case.constraint,
                                 sampling=sampling, **kwargs)

    variants = [
        ("sampled", request(sampling=SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=seed))),
        ("greedy", request(sampling=SamplingParams(temperature=0.0, seed=seed))),
        ("hot top-k", request(sampling=SamplingParams(temperature=1.5, top_k=5, top_p=1.0, min_p=0.0,
                                                      seed=seed + 1))),
        ("eos banned", request(sampling=SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=seed + 2),
                               ban_eos=True)),
    ]
    if case.literals:
        literal = case.literals[seed % len(case.literals)]
        variants += [
            ("stop string", request(sampling=SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=seed + 3),
                                    stop_strings=[literal[: max(1, len(literal) // 2)]])),
            ("phrase ban", request(sampling=SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=seed + 4),
                                   banned_phrases=[literal])),
        ]
    return variants


def verdict(case: Case, name: str, request: GenerationRequest, result: GenerationResult) -> str | None:
    """Why ``result`` breaks the contract (None if it keeps it)."""
    text, reason = result.text, result.stop_reason
    state = case.judge(text)
    if reason == "length" and state == "invalid" and text.endswith("\ufffd"):
        state = case.judge(text[:-1])  # cut inside a character: its bytes so far became U+FFFD
    banned = [phrase for phrase in request.banned_phrases if phrase.lower() in text.lower()]
    if banned:
        return f"{name}: banned {banned[0]!r} is in {text!r}"
    if reason in ("eos", "stop_string"):
        return None if state == COMPLETE else f"{name}: ended by {reason} but {state}: {text!r}"
    if reason == "length":
        return None if state in (COMPLETE, PREFIX) else f"{name}: cut by length but {state}: {text!r}"
    if reason == "grammar":
        if not (request.banned_phrases or request.ban_eos):
            return f"{name}: the grammar ran out of tokens with nothing banned: {text!r}"
        return None if state in (COMPLETE, PREFIX) else f"{name}: ended early but {state}: {text!r}"
    return f"{name}: unexpected end {reason!r}: {text!r}"


def run_case(engine: Engine, case: Case, seed: int) -> tuple[list[str], list[str]]:
    """All variants of ``case`` at once on ``engine``; (how each reply ended, failures)."""
    variants = settings_for(case, seed)
    jobs = [(name, request, engine.submit(request)) for name, request in variants]
    ends, failures = [], []
    for name, request, job in jobs:
        result = job.wait()
        ends.append(result.stop_reason)
        failure = verdict(case, name, request, result)
        if failure:
            failures.append(f"{failure}\n  constraint: {case.description.strip()}")
    return ends, failures
