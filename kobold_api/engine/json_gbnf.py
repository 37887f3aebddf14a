r"""JSON schema -> GBNF grammar (llama.cpp's format), for ``/api/extra/json_to_grammar``.

``schema_to_gbnf(schema)`` returns GBNF text, ``root`` rule first.  What it cannot express
faithfully raises ``SchemaConversionError`` (a ``ValueError``) naming the JSON path, e.g.
``#/properties/tags: unsupported keyword 'uniqueItems'``.

Supported:
* ``true``/``{}`` (any value); ``type`` as a name or a list (if absent, inferred from the
  keywords used); ``enum``/``const`` (alone or with ``type``); ``anyOf``/``oneOf`` as
  alternatives (oneOf's exclusivity is not enforced; sibling keywords are merged into each);
  ``allOf`` merged (properties/required joined, bounds tightened, types intersected, other
  conflicts raise); local ``$ref`` (``#``, ``#/$defs/..``, ``#/definitions/..``, any JSON
  pointer) with one rule per target, so recursive schemas work.
* objects: ``properties`` in declared order (``required`` ones mandatory, the others
  optional; a required name without a schema takes any value); ``additionalProperties``
  ``true``/a schema allows extra members after the declared ones.  NOTE: when it is ABSENT
  next to ``properties``/``required`` no extra members are allowed (like llama.cpp's
  converter, unlike JSON schema); a bare ``{"type": "object"}`` is any object.
* arrays: ``items`` (a schema, ``false``, or a tuple list + ``additionalItems``),
  ``prefixItems`` (nothing after them unless ``items`` allows it), ``minItems``/``maxItems``.
* strings: ``minLength``/``maxLength``; ``format`` date, time, date-time, uuid (others: any
  string); ``pattern``: literals, ``.``, ``[...]``/``[^...]``, ``\d\w\s\D\W\S``, ``\xHH``,
  ``\uHHHH``, ``(..)``/``(?:..)``, ``|``, ``* + ? {m} {m,} {,n} {m,n}`` (lazy ``?`` too),
  ``^``/``$`` around top-level branches (an unanchored side allows any text, as in JSON
  schema).  ``.`` and negated classes never produce ``"``, ``\`` or control characters.
* integers: ``minimum``/``maximum``/``exclusiveMinimum``/``exclusiveMaximum``, exactly (as
  digit ranges); numbers: only ``minimum: 0``.

Not supported (raises): ``not``, ``if``/``then``/``else``, ``uniqueItems``, ``contains``,
``patternProperties``, ``propertyNames``, ``min/maxProperties``, ``dependent*``,
``unevaluated*``, ``multipleOf``, other number bounds, remote ``$ref``, ``false`` schemas,
lookarounds/backreferences/``\b`` in patterns, and unknown keywords.  Annotations (title,
description, examples, default, $schema, $id, $comment, ...) are ignored.

Stricter than JSON schema: declared keys, ``enum``/``const`` strings and pattern characters
match their unescaped spelling only.  Looser: extra members' keys may repeat declared ones.
Bounded so small models cannot loop: ``space ::= | " " | "\n" [ \t]{0,20}``, numbers have at
most 16 integer, 20 fraction and 3 exponent digits.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable
from urllib.parse import unquote

__all__ = ["SchemaConversionError", "schema_to_gbnf"]


class SchemaConversionError(ValueError):
    """The schema uses something the converter cannot express; the message names the path."""


_PRIMS = {
    "space": r'| " " | "\n" [ \t]{0,20}',
    "char": r'[^"\\\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} )',
    "string": r'"\"" char* "\"" space',
    "integral": r'"-"? ( "0" | [1-9] [0-9]{0,15} )',
    "integer": "integral space",
    "number": r'integral ( "." [0-9]{1,20} )? ( [eE] [-+]? [0-9]{1,3} )? space',
    "boolean": r'( "true" | "false" ) space',
    "null": r'"null" space',
    "value": "object | array | string | number | boolean | null",
    "object": r'"{" space ( string ":" space value ( "," space string ":" space value )* )? "}" space',
    "array": r'"[" space ( value ( "," space value )* )? "]" space',
    "date": r'[0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [12] [0-9] | "3" [01] )',
    "time": r'( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{1,9} )? '
            r'( [zZ] | [-+] ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )',
    "date-time": "date [tT] time",
    "uuid": r'[0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{12}',
}
_ANNOTATIONS = {"title", "description", "examples", "default", "$schema", "$id", "$comment", "$anchor",
                "deprecated", "readOnly", "writeOnly", "$defs", "definitions", "$vocabulary"}
_BOUNDS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
_FAMILIES = {"object": {"properties", "required", "additionalProperties"},
             "array": {"items", "prefixItems", "additionalItems", "minItems", "maxItems"},
             "string": {"minLength", "maxLength", "pattern", "format"}, "number": _BOUNDS}
_SUPPORTED = set().union(*_FAMILIES.values()) | {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref"}
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_NAME = re.compile(r"[a-z][a-z0-9-]*")
_LITERALS = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]|\{[0-9,]*\}')
_ATOM = re.compile(r'[a-z][a-z0-9-]*|"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]')
_STR_SPECIAL = [(0, 0x1F), (0x22, 0x22), (0x5C, 0x5C)]  # must be escaped inside JSON strings


def schema_to_gbnf(schema: dict | bool) -> str:
    """Return GBNF text (``root`` rule first) accepting JSON text that matches ``schema``."""
    return _Converter(schema).convert()


def _err(path: str, message: str) -> SchemaConversionError:
    return SchemaConversionError(f"{path}: {message}")


def _lit(text: str) -> str:
    esc = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    return '"' + "".join(esc.get(c) or (f"\\x{ord(c):02X}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
                         for c in text) + '"'


def _chars(text: str) -> str:
    """One literal per character: multi-character literals are single greedy tokens to
    llguidance, which could then never backtrack into a shorter alternative."""
    return " ".join(_lit(c) for c in text)


def _json_lit(value: Any) -> str:
    return _lit(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def _cc(code: int) -> str:  # one character inside a GBNF [...] class
    return chr(code) if code >= 0x80 or chr(code).isalnum() else f"\\x{code:02X}"


def _group(expr: str) -> str:
    """``expr`` as one unit: a name, literal, class, or a parenthesised group."""
    if _ATOM.fullmatch(expr):
        return expr
    flat, depth = _LITERALS.sub("x", expr), 0
    for i, c in enumerate(flat):
        depth += (c == "(") - (c == ")")
        if depth == 0:
            return expr if c == ")" and i == len(flat) - 1 else f"( {expr} )"
    return f"( {expr} )"


def _seq(*parts: str | None) -> str:
    return " ".join(p for p in parts if p)


def _alt(exprs: list[str]) -> str:
    return " | ".join(dict.fromkeys(exprs))


#: Repetition counts beyond this are refused (a minimum) or read as unbounded (a maximum): the
#: grammar engine unrolls counted repetitions.
MAX_COUNT = 10_000
#: Integer bounds beyond this many digits are refused (they become digit-by-digit rules).
MAX_BOUND_DIGITS = 18


def _rep(expr: str, lo: int, hi: int | None) -> str:
    if lo > MAX_COUNT:
        raise SchemaConversionError(f"#: a minimum count of {lo} is beyond {MAX_COUNT}")
    if hi is not None and hi > MAX_COUNT:
        hi = None
    if hi == 0 or (lo, hi) == (1, 1):
        return "" if hi == 0 else expr
    suffix = {(0, None): "*", (1, None): "+", (0, 1): "?"}.get((lo, hi))
    return _group(expr) + (suffix or (f"{{{lo}}}" if lo == hi else f"{{{lo},{'' if hi is None else hi}}}"))


def _is_type(v: Any, t: str) -> bool:
    if t in ("integer", "number"):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and (t == "number" or v == int(v))
    return v is None if t == "null" else isinstance(v, {"object": dict, "array": list, "string": str,
                                                         "boolean": bool}[t])


def _same_len(a: str, b: str) -> str:
    """Every number between the digit strings a <= b of equal length."""
    if a == b or len(a) == 1:
        return _chars(a) if a == b else f"[{a}-{b}]"
    common = next(i for i in range(len(a)) if a[i] != b[i])
    if common:
        return f"{_chars(a[:common])} {_group(_same_len(a[common:], b[common:]))}"
    k, lo_d, hi_d, alts, tail = len(a) - 1, int(a[0]), int(b[0]), [], []
    if a[1:] != "0" * k:
        alts, lo_d = [f"{_lit(a[0])} {_group(_same_len(a[1:], '9' * k))}"], lo_d + 1
    if b[1:] != "9" * k:
        tail, hi_d = [f"{_lit(b[0])} {_group(_same_len('0' * k, b[1:]))}"], hi_d - 1
    middle = [f"[{lo_d}-{hi_d}] {_rep('[0-9]', k, k)}"] if lo_d <= hi_d else []
    return _alt(alts + middle + tail)


def _uint_range(lo: int, hi: int | None) -> str:
    alts, n = [], len(str(lo))
    while True:
        first = 10 ** (n - 1) if n > 1 else 0
        a, b = max(lo, first), 10 ** n - 1 if hi is None else min(10 ** n - 1, hi)
        if hi is None and a == first and n > 1:
            return _alt(alts + [f"[1-9] {_rep('[0-9]', n - 1, max(n - 1, 15))}"])
        if a > b:
            return _alt(alts)
        alts.append(_same_len(str(a), str(b)))
        n += 1


def _int_range(lo: int | None, hi: int | None) -> str:
    alts = []
    if lo is None or lo < 0:
        nlo, nhi = (1 if hi is None or hi >= 0 else -hi), (None if lo is None else -lo)
        if nhi is None or nlo <= nhi:
            alts.append(f'"-" {_group(_uint_range(nlo, nhi))}')
    if hi is None or hi >= 0:
        alts.append(_uint_range(0 if lo is None else max(lo, 0), hi))
    return _alt(alts)


def _refs(body: str) -> dict[str, None]:
    """The rule names ``body`` refers to, in order (a dict used as an ordered set)."""
    return dict.fromkeys(_NAME.findall(_LITERALS.sub("", body)))


class _Converter:
    def __init__(self, schema: Any):
        self.root, self.rules, self.refs = schema, {"root": ""}, {"#": "root"}

    def convert(self) -> str:
        body = self.rules["root"] = self._expr(self.root, "root", "#")
        if body == "root":
            raise _err("#", "'$ref' to the root schema without anything in between")
        terminal: set[str] = set()  # rules made of terminals only (llguidance lexes each as one token)
        while new := {k for k, v in self.rules.items()
                      if k not in terminal | {"root"} and set(_refs(v)) <= terminal}:
            terminal |= new
        if set(_refs(body)) <= terminal and not _NAME.fullmatch(body):  # keep a terminal root one token
            rule = self._add("root-value", body)
            self.rules = {"root": rule, rule: body, **{k: v for k, v in self.rules.items() if k != "root"}}
        return "".join(f"{k} ::= {v}\n" for k, v in self.rules.items())

    def _add(self, name: str, body: str) -> str:
        """Add a rule under a unique name derived from ``name`` (body "" reserves it)."""
        base = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "r"
        cand = base = base if base[0].isalpha() else "r-" + base
        i = 1
        while cand in self.rules or cand in _PRIMS:
            cand, i = f"{base}-{i}", i + 1
        self.rules[cand] = body
        return cand

    def _prim(self, name: str) -> str:
        if name not in self.rules:
            self.rules[name] = _PRIMS[name]
            for dep in _refs(_PRIMS[name]):
                self._prim(dep)
        return name

    def _rule(self, schema: Any, name: str, path: str) -> str:
        expr = self._expr(schema, name, path)
        return expr if _NAME.fullmatch(expr) else self._add(name, expr)

    def _ref(self, ref: Any, path: str) -> str:
        key, seen = ref.rstrip("/") if isinstance(ref, str) else ref, set()
        while key not in self.refs:
            target = self._resolve(key, path)
            if isinstance(target, dict) and [k for k in target if k not in _ANNOTATIONS] == ["$ref"]:
                if key in seen:  # an alias of an alias ... of itself
                    raise _err(path, f"'$ref' cycle through {key!r}")
                seen.add(key)
                key = target["$ref"].rstrip("/") if isinstance(target["$ref"], str) else target["$ref"]
                continue
            self.refs[key] = rule = self._add(key.rsplit("/", 1)[-1], "")
            self.rules[rule] = self._expr(target, rule, key)
        return self.refs[key]

    def _resolve(self, ref: Any, path: str) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise _err(path, f"only local '$ref' ('#/...') is supported, got {ref!r}")
        node = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                raise _err(path, f"'$ref' {ref!r} does not resolve")
        return node

    def _deref(self, schema: Any, path: str, depth: int) -> Any:
        """Inline a ``$ref`` with siblings and an ``allOf`` by merging the schemas."""
        if depth > 32:
            raise _err(path, "'$ref'/'allOf' nesting too deep (a cycle?)")
        if isinstance(schema, dict) and "$ref" in schema:
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            return self._merge(self._resolve(schema["$ref"], path), rest, path, depth + 1)
        if isinstance(schema, dict) and "allOf" in schema:
            if not isinstance(schema["allOf"], list) or not schema["allOf"]:
                raise _err(f"{path}/allOf", "must be a non-empty list")
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for i, part in enumerate(schema["allOf"]):
                merged = self._merge(merged, part, f"{path}/allOf/{i}", depth + 1)
            return merged
        return schema

    def _merge(self, a: Any, b: Any, path: str, depth: int = 0) -> Any:
        a, b = self._deref(a, path, depth), self._deref(b, path, depth)
        if a is False or b is False or not isinstance(a, (dict, bool)) or not isinstance(b, (dict, bool)):
            raise _err(path, "'false' or non-object schema cannot be merged")
        if a is True or b is True:
            return b if a is True else a
        out = dict(a)
        for k, v in b.items():
            if k not in out or k in _ANNOTATIONS or out[k] == v:
                out.setdefault(k, v)
            elif k == "properties":
                out[k] = {**out[k], **{p: self._merge(out[k][p], s, f"{path}/properties/{p}", depth + 1)
                                       if p in out[k] else s for p, s in v.items()}}
            elif k == "required":
                out[k] = list(dict.fromkeys(list(out[k]) + list(v)))
            elif k == "type":
                ta, tb = [out[k]] if isinstance(out[k], str) else out[k], [v] if isinstance(v, str) else v
                both = [t for t in ta if t in tb] + ["integer" for x, y in ((ta, tb), (tb, ta))
                                                     if "number" in x and "integer" in y]
                if not both:
                    raise _err(path, f"'allOf' types {ta} and {tb} do not intersect")
                out[k] = list(dict.fromkeys(both))
            elif k in ("minimum", "exclusiveMinimum", "minLength", "minItems"):
                out[k] = max(out[k], v)
            elif k in ("maximum", "exclusiveMaximum", "maxLength", "maxItems"):
                out[k] = min(out[k], v)
            else:
                raise _err(path, f"cannot merge conflicting '{k}' values in 'allOf'")
        return out

    def _expr(self, schema: Any, name: str, path: str) -> str:
        """A GBNF expression for ``schema`` (ending in ``space``), or the name of its rule."""
        if schema is True or schema == {}:
            return self._prim("value")
        if not isinstance(schema, dict):
            raise _err(path, "'false' schema matches nothing" if schema is False else "schema must be an object")
        keys = [k for k in schema if k not in _ANNOTATIONS]
        for k in keys:
            if k not in _SUPPORTED:
                raise _err(path, f"unsupported keyword {k!r}")
        if keys == ["$ref"]:
            return self._ref(schema["$ref"], path)
        if "$ref" in keys or "allOf" in keys:
            return self._expr(self._deref(schema, path, 0), name, path)
        alt_keys = [k for k in keys if k in ("anyOf", "oneOf")]
        if alt_keys:
            alts, key = schema[alt_keys[0]], alt_keys[0]
            if len(alt_keys) > 1 or not isinstance(alts, list) or not alts:
                raise _err(path, f"'{key}' must be a non-empty list (and not combined with the other)")
            rest = {k: v for k, v in schema.items() if k != key}
            merge = any(k not in _ANNOTATIONS for k in rest)
            return _alt([self._rule(self._merge(rest, s, p) if merge else s, f"{name}-{i}", p)
                         for i, s in enumerate(alts) for p in [f"{path}/{key}/{i}"]])
        types = [schema["type"]] if isinstance(schema.get("type"), str) else schema.get("type")
        if "type" in schema and types is None:
            raise _err(f"{path}/type", "invalid type None")
        if types is not None and (not isinstance(types, list) or not types or any(t not in _TYPES for t in types)):
            raise _err(f"{path}/type", f"invalid type {schema['type']!r}")
        if "enum" in keys or "const" in keys:
            return self._enum(schema, keys, types, path)
        types = types or [t for t in _TYPES if _FAMILIES.get(t, set()) & set(keys)] or ["value"]
        if len(types) > 1:
            return _alt([self._rule({**schema, "type": t}, f"{name}-{t}", path) for t in types])
        if types[0] in ("boolean", "null", "value"):
            return self._prim(types[0])
        return getattr(self, "_" + types[0])(schema, name, path)

    def _enum(self, schema: dict, keys: list, types: list | None, path: str) -> str:
        extra = [k for k in keys if k not in ("enum", "const", "type")]
        if extra:
            raise _err(path, f"{extra[0]!r} combined with 'enum'/'const' is not supported")
        values = schema.get("enum", [schema.get("const")])
        if not isinstance(values, list):
            raise _err(f"{path}/enum", "must be a list")
        values = [v for v in values if ("const" not in schema or v == schema["const"])
                  and (types is None or any(_is_type(v, t) for t in types))]
        if not values:
            raise _err(path, "no 'enum'/'const' value matches the schema")
        return _alt([self._const(v) for v in values])

    def _const(self, v: Any) -> str:
        sp, comma = self._prim("space"), f' "," {self._prim("space")} '
        if isinstance(v, dict):
            inner = comma.join(f'{_json_lit(k)} {sp} ":" {sp} {self._const(x)}' for k, x in v.items())
            return _seq('"{"', sp, inner, '"}"', sp)
        if isinstance(v, list):
            return _seq('"["', sp, comma.join(self._const(x) for x in v), '"]"', sp)
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        return f"{_chars(json.dumps(v)) if number else _json_lit(v)} {sp}"

    def _object(self, schema: dict, name: str, path: str) -> str:
        props, required = schema.get("properties", {}), schema.get("required", [])
        if not isinstance(props, dict) or not isinstance(required, list) or \
                not all(isinstance(r, str) for r in required):
            raise _err(path, "'properties' must be an object and 'required' a list of names")
        extra = schema.get("additionalProperties", None if (props or required) else True)
        props = {**props, **{r: extra if isinstance(extra, dict) else True for r in required if r not in props}}
        sp, items, extra_kv = self._prim("space"), [], None
        for key, sub in props.items():
            value = self._rule(sub, f"{name}-{key}", f"{path}/properties/{key}")
            items.append((f'{_json_lit(key)} {sp} ":" {sp} {value}', key in required))
        if extra not in (None, False):
            value = self._rule(extra, f"{name}-additional", f"{path}/additionalProperties")
            extra_kv = self._add(f"{name}-kv", f'{self._prim("string")} ":" {sp} {value}')

        def after(i: int) -> str:  # members from index i once some member was emitted
            if i == len(items):
                return f'( "," {sp} {extra_kv} )*' if extra_kv else ""
            part = f'"," {sp} {items[i][0]}'
            return _seq(part if items[i][1] else f"( {part} )?", after(i + 1))

        def first(i: int) -> list[str]:  # alternatives while no member was emitted yet
            if i == len(items):
                return [_seq(extra_kv, after(i)), ""] if extra_kv else [""]
            cur = _seq(items[i][0], after(i + 1))
            return [cur] if items[i][1] else [cur] + first(i + 1)

        alts = first(0)
        body = _alt([a for a in alts if a])
        body = f"( {body} )?" if body and "" in alts else (f"( {body} )" if " | " in body else body)
        return _seq('"{"', sp, body, '"}"', sp)

    def _array(self, schema: dict, name: str, path: str) -> str:
        items, prefix = schema.get("items"), schema.get("prefixItems", [])
        if isinstance(items, list):
            prefix, items = items, schema.get("additionalItems", True)
        elif items is None:
            items = "prefixItems" not in schema
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        if not isinstance(prefix, list) or not isinstance(lo, int) or not isinstance(hi, (int, type(None))):
            raise _err(path, "invalid 'prefixItems', 'minItems' or 'maxItems'")
        pre = [self._rule(s, f"{name}-{i}", f"{path}/prefixItems/{i}") for i, s in enumerate(prefix)]
        rest = None if items is False else self._rule(items, f"{name}-item", f"{path}/items")
        if rest is None:
            hi = len(pre) if hi is None else min(hi, len(pre))
        if hi is not None and lo > hi:
            raise _err(path, f"'minItems' {lo} cannot be satisfied")
        sp = self._prim("space")

        def tail(i: int) -> str:  # items from index i (after the first, each follows a comma)
            if hi is not None and i >= hi:
                return ""
            if i < len(pre):
                body = _seq(f'"," {sp}' if i else "", pre[i], tail(i + 1))
            elif i == 0:
                body = _seq(rest, _rep(f'"," {sp} {rest}', max(lo - 1, 0), None if hi is None else hi - 1))
            else:
                return _rep(f'"," {sp} {rest}', max(lo - i, 0), None if hi is None else hi - i)
            return body if i < lo else f"( {body} )?"

        return _seq('"["', sp, tail(0), '"]"', sp)

    def _string(self, schema: dict, name: str, path: str) -> str:
        used = [k for k in ("pattern", "format", "minLength", "maxLength") if k in schema]
        fmt, quote, sp = schema.get("format"), r'"\""', self._prim("space")
        if fmt in ("date", "time", "date-time", "uuid") or "pattern" in schema:
            if len(used) > 1 and not (used[0] == "pattern" and used[1:] == ["format"]):
                raise _err(path, f"{used[0]!r} cannot be combined with {used[1]!r}")
            if "pattern" in schema:
                char = lambda: self._prim("char")  # noqa: E731 - added only when the pattern needs it
                return _seq(quote, _Pattern(schema["pattern"], f"{path}/pattern", char).convert(), quote, sp)
            return _seq(quote, self._prim(fmt), quote, sp)
        lo, hi = schema.get("minLength", 0), schema.get("maxLength")
        if not isinstance(lo, int) or not isinstance(hi, (int, type(None))) or (hi is not None and hi < lo):
            raise _err(path, "invalid 'minLength'/'maxLength'")
        return _seq(quote, _rep(self._prim("char"), lo, hi), quote, sp)

    def _integer(self, schema: dict, name: str, path: str) -> str:
        b = {k: schema[k] for k in _BOUNDS if k in schema}
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in b.values()):
            raise _err(path, f"integer bounds must be numbers, got {b}")
        if any(not math.isfinite(v) or abs(v) >= 10 ** MAX_BOUND_DIGITS for v in b.values()):
            raise _err(path, f"integer bounds must be below 1e{MAX_BOUND_DIGITS} in size, got {b}")
        lo = max([math.ceil(v) if k == "minimum" else math.floor(v) + 1 for k, v in b.items() if "inimum" in k],
                 default=None)
        hi = min([math.floor(v) if k == "maximum" else math.ceil(v) - 1 for k, v in b.items() if "aximum" in k],
                 default=None)
        if lo is None and hi is None:
            return self._prim("integer")
        if lo is not None and hi is not None and lo > hi:
            raise _err(path, f"integer bounds {lo}..{hi} are empty")
        return f"{_group(_int_range(lo, hi))} {self._prim('space')}"

    def _number(self, schema: dict, name: str, path: str) -> str:
        bounds = {k: schema[k] for k in _BOUNDS if k in schema}
        if bounds and bounds != {"minimum": 0}:
            raise _err(path, f"number bounds {bounds} are not supported (only minimum: 0)")
        if not bounds:
            return self._prim("number")
        return _PRIMS["number"].replace("integral", '( "0" | [1-9] [0-9]{0,15} )').replace(
            "space", self._prim("space"))


_RX_TOKEN = re.compile(r"\\x[0-9a-fA-F]{2}|\\u[0-9a-fA-F]{4}|\\.|\[\^?\]?(?:\\.|[^\]\\])*\]|\(\?:?|[*+?]\??"
                       r"|\{(?:\d+(?:,\d*)?|,\d+)\}\??|.", re.S)
_RX_SHORT = {"d": [(48, 57)], "w": [(48, 57), (65, 90), (95, 95), (97, 122)], "s": [(9, 13), (32, 32)]}


class _Pattern:
    """Translate a regex (the subset above) into GBNF over the JSON-escaped string text."""

    def __init__(self, pattern: Any, path: str, char: Callable[[], str]):
        if not isinstance(pattern, str):
            raise _err(path, "must be a string")
        self.p, self.path, self.char, self.k = pattern, path, char, 0
        self.toks = _RX_TOKEN.findall(pattern)

    def fail(self, what: str) -> SchemaConversionError:
        return _err(self.path, f"{what} in {self.p!r} is not supported")

    def peek(self) -> str:
        return self.toks[self.k] if self.k < len(self.toks) else ""

    def convert(self) -> str:
        body = self.alt(top=True)
        if self.k < len(self.toks):
            raise self.fail(repr(self.peek()))
        return "" if body == '""' else _group(body)

    def alt(self, top: bool = False) -> str:
        alts = [self.seq(top)]
        while self.peek() == "|":
            self.k += 1
            alts.append(self.seq(top))
        return _alt([a or '""' for a in alts]) if len(alts) > 1 else alts[0]

    def seq(self, top: bool) -> str:
        """A branch; at the top level ``^``/``$`` anchor it, else any text may surround it."""
        out: list[str] = []
        start, end = top and self.peek() == "^", False
        self.k += start
        while self.peek() not in ("", "|", ")"):
            if top and self.peek() == "$" and self.toks[self.k + 1:self.k + 2] in ([], ["|"]):
                self.k, end = self.k + 1, True
                break
            atom = self.atom(self.toks[self.k])
            if m := re.fullmatch(r"([*+?])\??|\{(\d*)(,(\d*))?\}\??", self.peek()):
                self.k += 1
                if re.fullmatch(r"[*+?]\??|\{[\d,].*", self.peek()):
                    raise self.fail("a repeated quantifier")
                if m.group(1):
                    atom = _rep(atom, *{"*": (0, None), "+": (1, None), "?": (0, 1)}[m.group(1)])
                else:
                    lo = int(m.group(2) or 0)
                    hi = lo if m.group(3) is None else int(m.group(4)) if m.group(4) else None
                    if hi is not None and hi < lo:
                        raise self.fail(f"quantifier {m.group(0)!r}")
                    atom = _rep(atom, lo, hi)
            out += [atom] if atom else []
        body = " ".join(out)
        if not top:
            return body
        any_text = self.char() + "*"
        return _seq(None if start else any_text, _group(body) if body else "",
                    None if end or not (body or start) else any_text) or '""'


    def atom(self, tok: str) -> str:
        self.k += 1
        if tok in ("(", "(?:"):
            body = self.alt()
            if self.peek() != ")":
                raise self.fail("unbalanced '('")
            self.k += 1
            return _group(body) if body else ""
        if tok == ".":
            return self.klass_expr([], negate=True)
        if len(tok) > 1 and tok[0] == "[":
            negate = tok[1] == "^"
            items = re.findall(r"\\x[0-9a-fA-F]{2}|\\u[0-9a-fA-F]{4}|\\.|.", tok[1 + negate:-1], re.S)
            ranges: list[tuple[int, int]] = []
            while items:
                if len(items) >= 3 and items[1] == "-":
                    lo, hi = self.code(items[0]), self.code(items[2])
                    if lo is None or hi is None or hi < lo:
                        raise self.fail(f"class range {''.join(items[:3])!r}")
                    ranges, items = ranges + [(lo, hi)], items[3:]
                    continue
                code = self.code(items[0])
                if code is None and items[0][1].isupper():
                    raise self.fail(f"{items[0]!r} inside a class")
                ranges += [(code, code)] if code is not None else _RX_SHORT[items[0][1]]
                items = items[1:]
            return self.klass_expr(ranges, negate)
        if tok in ("^", "$", ")", "(?", "[") or re.fullmatch(r"[*+?]\??|\{[\d,].*", tok):
            raise self.fail(repr(tok))
        code = self.code(tok)
        if code is None:
            return self.klass_expr(_RX_SHORT[tok[1].lower()], negate=tok[1].isupper())
        return _chars(json.dumps(chr(code), ensure_ascii=False)[1:-1])

    def code(self, tok: str) -> int | None:
        """The character a (possibly escaped) token stands for; None for \\d \\w \\s and negations."""
        if tok == "\\":
            raise self.fail("a trailing backslash")
        if tok[0] != "\\":
            return ord(tok)
        if tok[1].lower() in _RX_SHORT:
            return None
        if tok[1] in "xu" and len(tok) > 2:
            return int(tok[2:], 16)
        if tok[1].isalnum() and tok[1] not in "ntrfv":
            raise self.fail(f"escape {tok!r}")
        return {"n": 10, "t": 9, "r": 13, "f": 12, "v": 11}.get(tok[1], ord(tok[1]))

    @staticmethod
    def klass_expr(ranges: list[tuple[int, int]], negate: bool) -> str:
        if negate:  # never matches '"', '\\' or control characters (those need JSON escapes)
            return "[^" + "".join(_cc(a) if a == b else f"{_cc(a)}-{_cc(b)}" for a, b in ranges + _STR_SPECIAL) + "]"
        plain, escaped = [], []
        for lo, hi in ranges:
            c = lo
            while c <= hi:
                if c < 0x20 or c in (0x22, 0x5C):  # spelled as a JSON escape
                    escaped.append(_chars(json.dumps(chr(c))[1:-1]))
                    c += 1
                else:
                    end = min([hi] + [s - 1 for s in (0x22, 0x5C) if c < s <= hi])
                    plain.append(_cc(c) if c == end else f"{_cc(c)}-{_cc(end)}")
                    c = end + 1
        return _group(_alt(([f"[{''.join(plain)}]"] if plain else []) + escaped))
