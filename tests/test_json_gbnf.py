"""JSON schema -> GBNF: the grammar must accept valid instances and reject invalid ones.

Acceptance is checked with llguidance over a byte-level tokenizer (one token per byte, plus
EOS), so no model is needed, in both of llguidance's readings of GBNF: as converted (rules made
only of terminals become single greedy tokens) and "character level" (those rules turned into
ordinary rules, as the server's constraint layer does).  Every accepted instance is also validated with ``jsonschema``,
and every rejected text that is JSON is checked to be invalid for ``jsonschema`` as well
(except where the converter is documented to be stricter than JSON schema).
"""

from __future__ import annotations

import json
import random
import re

import jsonschema
import llguidance
import pytest
from llguidance.gbnf_to_lark import gbnf_to_lark

from kobold_api.engine.json_gbnf import SchemaConversionError, schema_to_gbnf


class _ByteTokenizer:
    """What `llguidance.LLTokenizer` needs: 256 single-byte tokens and an EOS token."""

    def __init__(self) -> None:
        self.tokens = [bytes([i]) for i in range(256)] + [b"<eos>"]
        self.eos_token_id = 256
        self.bos_token_id = None
        self.special_token_ids = [256]
        self.is_tokenizer_wrapper = True

    def __call__(self, text: str | bytes) -> list[int]:
        return list(text.encode() if isinstance(text, str) else text)


TOKENIZER = llguidance.LLTokenizer(_ByteTokenizer())
VALIDATOR = jsonschema.Draft202012Validator


def _character_level(lark: str) -> str:
    """Rename the converted grammar's terminal rules (UPPER_CASE) to ordinary rules."""
    names = set(re.findall(r"^([A-Z][A-Z0-9_]*):", lark, re.M))
    assert not {"t_" + n.lower() for n in names} & set(re.findall(r"^([a-z_][a-z0-9_]*):", lark, re.M))
    pieces = re.split(r'("(?:[^"\\]|\\.)*"|/(?:[^/\\\n]|\\.)+/)', lark)  # keep strings and regexes
    return "".join(piece if i % 2 else re.sub(
        r"\b[A-Z][A-Z0-9_]*\b", lambda m: "t_" + m.group(0).lower() if m.group(0) in names else m.group(0), piece)
        for i, piece in enumerate(pieces))


def compile_grammar(schema: dict | bool, char_level: bool = False) -> str:
    text = schema_to_gbnf(schema)
    assert text.startswith("root ::= ")
    for line in text.splitlines():
        assert re.fullmatch(r"[a-z][a-z0-9-]* ::= .*", line), line
    if char_level:
        grammar = llguidance.LLMatcher.grammar_from_lark(_character_level(gbnf_to_lark(text)))
    else:
        grammar = llguidance.grammar_from("gbnf", text)
    assert llguidance.LLMatcher.validate_grammar(grammar) == "", text
    return grammar


def accepts(grammar: str, text: str) -> bool:
    matcher = llguidance.LLMatcher(TOKENIZER, grammar, log_level=0)
    ok = matcher.consume_tokens(list(text.encode("utf-8")))
    return ok and matcher.is_accepting() and not matcher.is_error()


def schema_valid(schema: dict | bool, instance: object) -> bool:
    return VALIDATOR(schema, format_checker=VALIDATOR.FORMAT_CHECKER).is_valid(instance)


def spellings(instance: object) -> list[str]:
    # Declared keys and enum/const strings are matched in their unescaped spelling only.
    return [json.dumps(instance, ensure_ascii=False, **style)
            for style in ({}, {"separators": (",", ":")}, {"indent": 2})]


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city"],
        },
        "email": {"type": "string", "format": "email"},
    },
    "required": ["name", "address"],
}

UUID = "123e4567-e89b-12d3-a456-426614174000"
TREE = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {"value": {"type": "integer"},
                           "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
            "required": ["value"],
        }
    },
    "$ref": "#/$defs/node",
}

# (schema, valid instances, invalid texts, texts the grammar rejects although jsonschema accepts
#  them: documented strictness, or a format jsonschema cannot check here)
CASES = {
    "nested-object": (
        PERSON,
        [{"name": "Ann", "address": {"city": "Oslo"}},
         {"name": "Bob", "age": 42, "address": {"city": "Rome", "zip": "00118"}, "email": "b@x.io"},
         {"name": "Q\"\\\u00e9", "address": {"city": ""}, "email": "x@y.z"}],
        ['{"address": {"city": "Oslo"}}', '{"name": "", "address": {"city": "x"}}',
         '{"name": "Ann"}', '{"name": "Ann", "age": 151, "address": {"city": "x"}}',
         '{"name": "Ann", "age": -1, "address": {"city": "x"}}',
         '{"name": "Ann", "age": 1.5, "address": {"city": "x"}}',
         '{"name": "Ann", "address": {"city": "x", "zip": "1234"}}',
         '{"name": "Ann", "address": {"zip": "12345"}}', '{"name": "Ann", "address": {"city": "x"}'],
        ['{"name": "Ann", "address": {"city": "x"}, "extra": 1}',
         '{"address": {"city": "x"}, "name": "Ann"}'],
    ),
    "array-bounds": (
        {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 4},
        [[1, 2], [0.5, -3e10, 7, 1e-3], [-0.0, 12.75, 3]],
        ["[]", "[1]", "[1, 2, 3, 4, 5]", '[1, "2"]', "[1, 2,]", "[01, 2]", "[1., 2]"],
        [],
    ),
    "tuple": (
        {"type": "array", "prefixItems": [{"type": "string"}, {"type": "boolean"}],
         "items": {"type": "null"}, "maxItems": 3},
        [["a", True], ["", False, None], ["x"], []],
        ['["a", true, null, null]', '[true]', '["a", "b"]', '["a", true, 1]'],
        [],
    ),
    "enum-const": (
        {"type": "object",
         "properties": {"color": {"enum": ["red", "green", None, 3, [1, "x"]]},
                        "kind": {"const": "fixed"},
                        "size": {"type": "string", "enum": ["S", "M", 7]}},
         "required": ["color", "kind"]},
        [{"color": "red", "kind": "fixed"}, {"color": None, "kind": "fixed", "size": "M"},
         {"color": 3, "kind": "fixed"}, {"color": [1, "x"], "kind": "fixed"}],
        ['{"color": "blue", "kind": "fixed"}', '{"color": "red", "kind": "loose"}',
         '{"color": "red", "kind": "fixed", "size": 7}', '{"color": 4, "kind": "fixed"}'],
        ['{"color": [1,  "x"], "kind": "fixed"}'],
    ),
    "any-of": (
        {"anyOf": [{"type": "integer", "minimum": 10}, {"type": "string", "maxLength": 2},
                   {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}]},
        [10, 99999, "", "ab", {"ok": True}],
        ["9", '"abc"', "{}", '{"ok": 1}', "null", "10.5"],
        [],
    ),
    "one-of-with-siblings": (
        {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
         "oneOf": [{"required": ["a"]}, {"required": ["b"]}]},
        [{"a": 1}, {"b": 2}],
        ["{}", '{"c": 1}'],
        [],
    ),
    "recursive-ref": (
        TREE,
        [{"value": 1}, {"value": 1, "children": []},
         {"value": 1, "children": [{"value": 2, "children": [{"value": 3}]}, {"value": -4}]}],
        ['{"value": 1, "children": [{}]}', '{"value": 1, "children": [{"value": "x"}]}',
         '{"children": []}', '{"value": 1, "children": {"value": 2}}'],
        [],
    ),
    "definitions-ref-in-list": (
        {"definitions": {"pt": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}},
         "type": "array", "items": {"$ref": "#/definitions/pt"}},
        [[], [[1, 2]], [[0, 0], [-5, 7]]],
        ["[[1]]", "[[1, 2, 3]]", "[[1, 2], 3]"],
        [],
    ),
    "all-of-merge": (
        {"allOf": [{"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]},
                   {"properties": {"tag": {"type": "string"}, "id": {"minimum": 1}}}]},
        [{"id": 1}, {"id": 5, "tag": "t"}],
        ['{"tag": "t"}', '{"id": 0}', '{"id": "1"}'],
        [],
    ),
    "string-pattern": (
        {"type": "string", "pattern": r"^(?:[A-Z]{2,3}|x\.y)-\d+(_[a-f]?)*$"},
        ["AB-1", "XYZ-1234_a_", "x.y-0"],
        ['"A-1"', '"ABCD-1"', '"AB-"', '"xzy-1"', '"AB-1_g"', '"ab-1"'],
        [],
    ),
    "unanchored-pattern": (
        {"type": "string", "pattern": "ab+c"},
        ["abc", "xxabbbcyy", "abc\n\"q"],
        ['"ac"', '"abd"', '""'],
        [],
    ),
    "formats": (
        {"type": "object",
         "properties": {"d": {"type": "string", "format": "date"}, "t": {"type": "string", "format": "time"},
                        "dt": {"type": "string", "format": "date-time"},
                        "u": {"type": "string", "format": "uuid"}},
         "required": ["d", "t", "dt", "u"]},
        [{"d": "2024-02-29", "t": "23:59:59Z", "dt": "2024-01-31T08:00:00.123+02:00",
          "u": "123e4567-e89b-12d3-a456-426614174000"}],
        ['{"d": "2024-13-01", "t": "23:59:59Z", "dt": "2024-01-31T08:00:00Z", "u": "%s"}' % UUID,
         '{"d": "2024-01-01", "t": "23:00:00Z", "dt": "2024-01-31T08:00:00Z", "u": "123e4567"}'],
        # jsonschema has no checker for time/date-time here, so it accepts these two
        ['{"d": "2024-01-01", "t": "24:00:00Z", "dt": "2024-01-31T08:00:00Z", "u": "%s"}' % UUID,
         '{"d": "2024-01-01", "t": "23:00:00Z", "dt": "2024-01-31 08:00:00Z", "u": "%s"}' % UUID],
    ),
    "type-list": (
        {"type": ["integer", "null", "boolean"]},
        [0, -12, None, True, False],
        ['"1"', "1.5", "[]", "nul", "01"],
        [],
    ),
    "additional-properties-schema": (
        {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"],
         "additionalProperties": {"type": "integer"}},
        [{"id": "a"}, {"id": "a", "x": 1, "y": -2}],
        ['{"id": "a", "x": "s"}', '{"x": 1}', '{"id": "a", "x": 1.5}'],
        [],
    ),
    "additional-properties-only": (
        {"type": "object", "additionalProperties": {"type": "boolean"}},
        [{}, {"a": True}, {"a": False, "b": True}],
        ['{"a": 1}', '{"a": true,}', "[]"],
        [],
    ),
    "ref-with-siblings-and-odd-keys": (
        {"$defs": {"base": {"type": "object", "properties": {"a\"b": {"type": "integer"}, "é ~/": {}}}},
         "$ref": "#/$defs/base", "required": ["a\"b"]},
        [{"a\"b": 1}, {"a\"b": -2, "é ~/": [None, {"k": "v"}]}],
        ["{}", '{"a\\"b": "x"}', '{"é ~/": 1}'],
        ['{"é ~/": 1, "a\\"b": 1}', '{"a\\"b": 1, "c": 2}'],
    ),
    "many-optional-properties": (
        {"type": "object", "properties": {k: {"type": "integer"} for k in "abcdefgh"}},
        [{}, {"h": 1}, {"a": 1, "h": 2}, {"c": 1, "d": 2, "g": 3}, {k: 0 for k in "abcdefgh"}],
        ['{"a": 1,}', '{, "a": 1}', '{"a": 1 "b": 2}', '{"a": "1"}'],
        ['{"b": 1, "a": 2}', '{"z": 1}'],
    ),
    "any-value": (
        {},
        [None, 1, "s", [1, {"a": [True, None]}], {"x": {"y": []}}],
        ["", "[1,]", "{'a': 1}", "tru", '"\\x"'],
        [],
    ),
    "string-length": (
        {"type": "string", "minLength": 2, "maxLength": 3},
        ["ab", "a\u00e9\"", "\\\\\\"],
        ['"a"', '"abcd"', '"ab'],
        [],
    ),
}


@pytest.mark.parametrize("char_level", [False, True], ids=["tokens", "chars"])
@pytest.mark.parametrize("name", list(CASES))
def test_grammar_matches_schema(name: str, char_level: bool) -> None:
    schema, valid, invalid, stricter = CASES[name]
    grammar = compile_grammar(schema, char_level)
    for instance in valid:
        assert schema_valid(schema, instance), instance
        for text in spellings(instance):
            assert accepts(grammar, text), text
    for text in invalid + stricter:
        assert not accepts(grammar, text), text
        try:
            instance = json.loads(text)
        except ValueError:
            continue
        assert schema_valid(schema, instance) == (text in stricter), text


def test_whitespace_is_bounded() -> None:
    grammar = compile_grammar({"type": "array", "items": {"type": "integer"}})
    assert accepts(grammar, "[\n" + " " * 20 + "1]")
    assert not accepts(grammar, "[\n" + " " * 21 + "1]")
    assert not accepts(grammar, "[  1]")


@pytest.mark.parametrize("lo,hi", [(0, 150), (-37, 1234), (5, None), (None, -3), (-999, -100),
                                   (None, 42), (1, 1), (-1, 0), (99, 1001)])
@pytest.mark.parametrize("char_level", [False, True], ids=["tokens", "chars"])
def test_integer_ranges(lo: int | None, hi: int | None, char_level: bool) -> None:
    schema: dict = {"type": "integer"}
    schema.update({k: v for k, v in (("minimum", lo), ("maximum", hi)) if v is not None})
    grammar = compile_grammar(schema, char_level)
    centre = [v for v in (lo, hi) if v is not None]
    candidates = {v + d for v in centre for d in range(-30, 31)} | {0, 1, -1, 10 ** 6, -(10 ** 6)}
    for value in sorted(candidates):
        inside = (lo is None or value >= lo) and (hi is None or value <= hi)
        assert accepts(grammar, str(value)) == inside, value
    assert not accepts(grammar, "007") and not accepts(grammar, "1.0")


def test_exclusive_bounds_and_nonnegative_number() -> None:
    grammar = compile_grammar({"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10})
    assert [v for v in range(-5, 15) if accepts(grammar, str(v))] == list(range(1, 10))
    grammar = compile_grammar({"type": "number", "minimum": 0})
    assert accepts(grammar, "0.5") and accepts(grammar, "12e3") and not accepts(grammar, "-1")


@pytest.mark.parametrize("pattern", [r"^a[bc]*d?$", r"x|yz", r"^[^a-c\d]{1,3}$", r"^\w+@\w+\.(com|org)$",
                                     r'^[-"\\ ]+$', r"^.\s.$", r"\d{2}", r"^(ab|a)(c|bc)$", r"^[]a-c]{,3}$",
                                     r"^\x41\u00e9?|z$", r"^(a|ab)bc$", r"^\n?.\n$"])
@pytest.mark.parametrize("char_level", [False, True], ids=["tokens", "chars"])
def test_pattern_agrees_with_python_re(pattern: str, char_level: bool) -> None:
    grammar = compile_grammar({"type": "string", "pattern": pattern}, char_level)
    ecma = pattern.replace("$", r"\Z")  # ECMA-262: `$` is the very end, \d \w \s are ASCII
    rng = random.Random(pattern)
    alphabet = "abcdxyz0129@._- \"\\\t\ncomrgABC]é"
    samples = ["abd", "abcbcd", "x", "yz", "a@b.com", "a@b.net", "12", "a b", "-\"\\", "abc"]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 7))) for _ in range(80)]
    for text in samples:
        expected = re.search(ecma, text, re.ASCII) is not None
        # `.` and negated classes never produce '"', '\\' or control characters (documented);
        # other characters are matched in their unescaped spelling only.
        if expected and re.search(r"\.|\[\^|\\[DWS]", pattern) and re.search(r'["\\\x00-\x1f]', text):
            continue
        assert accepts(grammar, json.dumps(text, ensure_ascii=False)) == expected, (pattern, text)


@pytest.mark.parametrize("schema,path,word", [
    ({"not": {"type": "string"}}, "#", "not"),
    ({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}},
     "#/properties/a", "uniqueItems"),
    ({"if": {"type": "string"}, "then": {"minLength": 1}}, "#", "if"),
    ({"type": "array", "items": {"type": "object", "patternProperties": {"x": {}}}}, "#/items",
     "patternProperties"),
    ({"type": "object", "properties": {"n": {"type": "number", "multipleOf": 2}}}, "#/properties/n",
     "multipleOf"),
    ({"type": "object", "properties": {"s": {"type": "string", "pattern": "(?=a)b"}}},
     "#/properties/s/pattern", "(?"),
    ({"type": "string", "pattern": r"^(a)\1$"}, "#/pattern", "\\1"),
    ({"type": "string", "pattern": "a^b"}, "#/pattern", "'^'"),
    ({"type": "string", "pattern": "a{3,1}"}, "#/pattern", "quantifier"),
    ({"type": "string", "pattern": "a++"}, "#/pattern", "repeated quantifier"),
    ({"type": "string", "pattern": "a\\"}, "#/pattern", "backslash"),
    ({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}}, "#", "cycle"),
    ({"$ref": "https://example.com/x.json"}, "#", "local"),
    ({"$ref": "#/$defs/missing"}, "#", "does not resolve"),
    ({"anyOf": [{"type": "string"}, {"type": "bogus"}]}, "#/anyOf/1/type", "invalid type"),
    ({"type": "number", "maximum": 3}, "#", "number bounds"),
    ({"type": "string", "pattern": "a", "maxLength": 3}, "#", "maxLength"),
    ({"type": "array", "prefixItems": [{}], "minItems": 2}, "#", "minItems"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "#/allOf/1", "intersect"),
    ({"type": "object", "properties": {"x": False}}, "#/properties/x", "false"),
    ({"enum": ["a"], "minLength": 1}, "#", "minLength"),
    ({"type": "object", "properties": {"x": {"foo": 1}}}, "#/properties/x", "foo"),
])
def test_unsupported_raises_with_path(schema: dict, path: str, word: str) -> None:
    with pytest.raises(SchemaConversionError) as info:
        schema_to_gbnf(schema)
    message = str(info.value)
    assert message.startswith(path + ":") and word in message, message


def test_output_shape() -> None:
    text = schema_to_gbnf({"title": "T", "description": "d", "$schema": "x", "type": "object",
                           "properties": {"first name": {"type": "string"}, "Ünïcode key!": {"type": "integer",
                                                                                          "minimum": 1}},
                           "required": ["first name"]})
    names = [line.split(" ::= ")[0] for line in text.splitlines()]
    assert names[0] == "root" and len(names) == len(set(names))
    assert all(re.fullmatch(r"[a-zA-Z0-9-]+", n) for n in names)
    assert "space ::= | \" \" | \"\\n\" [ \\t]{0,20}" in text.splitlines()
    assert schema_to_gbnf(True) == schema_to_gbnf({})
    grammar = compile_grammar({"type": "object", "properties": {"Ünïcode key!": {"type": "integer"}}})
    assert accepts(grammar, '{"Ünïcode key!": 3}') and accepts(grammar, "{}")
    grammar = compile_grammar({"type": "array", "items": {"type": "string"}})
    assert accepts(grammar, '["\\u00e9\\n\\"", "\\/"]') and not accepts(grammar, '["\\u00g9"]')
    assert not accepts(grammar, '["a\nb"]') and not accepts(grammar, '["\\x41"]')


@pytest.mark.parametrize("schema", [
    {"properties": {"a": {"type": "object"}}, "required": [{"x": 1}]}, {"type": None},
    {"type": "integer", "minimum": 1e300}, {"type": "integer", "maximum": float("nan")},
    {"type": "string", "minLength": 10**9}, {"required": "a"}, {"enum": 5}, {"anyOf": {}},
])
def test_malformed_schemas_are_refused_not_crashed_on(schema: dict) -> None:
    """What a fuzzer sends to /api/extra/json_to_grammar: a clear refusal, never a TypeError."""
    with pytest.raises(SchemaConversionError):
        schema_to_gbnf(schema)


def test_huge_maximum_counts_read_as_unbounded() -> None:
    assert "{" not in schema_to_gbnf({"type": "string", "maxLength": 10**9}).splitlines()[1]
