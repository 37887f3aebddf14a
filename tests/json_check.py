"""A strict RFC 8259 JSON reader of our own, for checking constrained output: is a text one
complete JSON value, a clean prefix of one (a reply cut by ``length``), or neither?

Independent of the engine and stricter than ``json.loads`` where it matters here: no raw
control characters in strings, nothing but the value (and, where asked, whitespace) up to the
end, and for a prefix every character so far must be one some valid JSON text continues from.
"""

from __future__ import annotations

import json

COMPLETE, PREFIX, INVALID = "complete", "prefix", "invalid"
_WHITESPACE = " \t\n\r"
_DIGITS = "0123456789"
_HEX = "0123456789abcdefABCDEF"


class _End(Exception):
    """The text ended inside the value: it is a prefix so far."""


class _Invalid(Exception):
    pass


class _Reader:
    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def peek(self) -> str:
        if self.pos >= len(self.text):
            raise _End
        return self.text[self.pos]

    def take(self, expected: str) -> None:
        if self.peek() not in expected:
            raise _Invalid(f"expected one of {expected!r} at {self.pos}, got {self.text[self.pos]!r}")
        self.pos += 1

    def whitespace(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in _WHITESPACE:
            self.pos += 1

    def value(self) -> None:
        self.whitespace()
        char = self.peek()
        if char == "{":
            self.container("}", member=True)
        elif char == "[":
            self.container("]", member=False)
        elif char == '"':
            self.string()
        elif char == "-" or char in _DIGITS:
            self.number()
        else:
            for literal in ("true", "false", "null"):
                if literal.startswith(char):
                    for expected in literal:
                        self.take(expected)
                    return
            raise _Invalid(f"no value starts with {char!r} at {self.pos}")

    def container(self, close: str, member: bool) -> None:
        self.pos += 1
        self.whitespace()
        if self.peek() == close:
            self.pos += 1
            return
        while True:
            if member:
                self.whitespace()
                if self.peek() != '"':
                    raise _Invalid(f"a key must be a string at {self.pos}")
                self.string()
                self.whitespace()
                self.take(":")
            self.value()
            self.whitespace()
            self.take("," + close)
            if self.text[self.pos - 1] == close:
                return

    def string(self) -> None:
        self.take('"')
        while True:
            char = self.peek()
            self.pos += 1
            if char == '"':
                return
            if ord(char) < 0x20:
                raise _Invalid(f"raw control character {char!r} in a string at {self.pos - 1}")
            if char == "\\":
                escape = self.peek()
                self.pos += 1
                if escape == "u":
                    for _ in range(4):
                        self.take(_HEX)
                elif escape not in '"\\/bfnrt':
                    raise _Invalid(f"bad escape \\{escape} at {self.pos - 1}")

    def number(self) -> None:
        if self.peek() == "-":
            self.pos += 1
        if self.peek() == "0":
            self.pos += 1
        else:
            self.take("123456789")
            self.digits()
        if self.pos < len(self.text) and self.text[self.pos] == ".":
            self.pos += 1
            self.take(_DIGITS)
            self.digits()
        if self.pos < len(self.text) and self.text[self.pos] in "eE":
            self.pos += 1
            if self.peek() in "+-":
                self.pos += 1
            self.take(_DIGITS)
            self.digits()

    def digits(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in _DIGITS:
            self.pos += 1


def json_state(text: str, trailing_whitespace: bool = False) -> str:
    """``complete`` (one JSON value and nothing after it but, if allowed, whitespace),
    ``prefix`` (valid so far, unfinished) or ``invalid``."""
    reader = _Reader(text)
    try:
        reader.value()
    except _End:
        return PREFIX
    except _Invalid:
        return INVALID
    end = reader.pos
    if trailing_whitespace:
        reader.whitespace()
    if reader.pos != len(text):
        return INVALID
    json.loads(text[:end], strict=True)  # a complete value must also be one to Python's parser
    return COMPLETE


def check_constrained_json(text: str, finish_reason: str, trailing_whitespace: bool = False) -> object | None:
    """Assert the contract of a JSON-constrained reply: ``stop`` means one complete value (which
    is returned), ``length`` a clean prefix of one (None returned; a complete one is fine too)."""
    state = json_state(text, trailing_whitespace)
    if finish_reason == "stop":
        assert state == COMPLETE, f"a reply that stopped is not one JSON value ({state}): {text!r}"
        return json.loads(text, strict=True)
    assert finish_reason == "length", finish_reason
    assert state in (COMPLETE, PREFIX), f"a reply cut by length is not a prefix of JSON: {text!r}"
    assert text, "a reply cut by length wrote nothing"
    return json.loads(text, strict=True) if state == COMPLETE else None
