"""Constrained decoding: a grammar or JSON schema that every generated token must fit.

llguidance does the work (see ``shared/reference/structured_output.md`` for why: no
dependencies, about a millisecond to compile, tens of microseconds per token mask, unlimited
rollback). This module keeps its API in one place:

* :class:`Constraint`: what a request asks for (GBNF, JSON schema, Lark), compiled and
  checked when the request is read, so a bad grammar is the client's 4xx, never a failed
  generation. A ``grammar`` that parses as a JSON object is a JSON schema (KoboldCpp's rule).
* :class:`GrammarVocabulary`: the model's tokenizer as llguidance sees it, built once per model.
* :class:`Guide`: one sequence's matcher. Before sampling it masks the tokens the grammar does
  not allow (EOS only where the grammar may end); after it consumes the chosen token; phrase
  bans that take tokens back roll it back too.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

import llguidance
from llguidance.gbnf_to_lark import any_to_lark

from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

#: JSON without free whitespace (llguidance's default, "any whitespace", lets a small model loop
#: on newlines forever), and ``oneOf`` read as ``anyOf`` (exclusivity cannot be masked for).
_JSON_OPTIONS = {"whitespace_flexible": False, "coerce_one_of": True}
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)


def with_json_options(schema: dict[str, Any] | bool) -> dict[str, Any] | bool:
    """``schema`` with our JSON output options (a client's own ``x-guidance`` options win)."""
    if not isinstance(schema, dict):
        return schema
    own = schema.get("x-guidance")
    return {**schema, "x-guidance": {**_JSON_OPTIONS, **(own if isinstance(own, dict) else {})}}


class ConstraintError(ValueError):
    """The grammar or schema cannot be used; the message says why (for the client)."""


@dataclass(frozen=True)
class Constraint:
    """A compiled grammar: ``kind`` is what the client sent (gbnf, json_schema, lark), ``grammar``
    llguidance's form of it.

    ``retain_state``: continue from where the last generation under the same grammar stopped
    (KoboldCpp's ``grammar_retain_state``), so a story written in parts stays in the grammar.
    """

    kind: str
    grammar: str
    retain_state: bool = False

    @classmethod
    def from_grammar(cls, text: str, retain_state: bool = False) -> "Constraint":
        """A GBNF grammar (llama.cpp's format; Lark too), or a JSON schema when ``text`` is one."""
        stripped = text.strip()
        if stripped.startswith("{"):
            try:
                schema = json.loads(stripped)
            except ValueError:
                schema = None
            if isinstance(schema, dict):
                return cls.from_json_schema(schema, retain_state)
        try:
            lark = _group_nested_repetitions(any_to_lark(_plain_unicode_escapes(text)))
            grammar = llguidance.LLMatcher.grammar_from_lark(_character_level(lark))
        except Exception as exc:  # the converter raises bare Exceptions for a bad grammar
            raise ConstraintError(f"Invalid grammar: {_first_line(exc)}") from None
        return cls._checked("gbnf", grammar, retain_state)

    @classmethod
    def from_json_schema(cls, schema: dict[str, Any] | bool, retain_state: bool = False) -> "Constraint":
        """Output that is JSON valid under ``schema`` (Draft 2020-12; unsupported keywords are errors)."""
        if not isinstance(schema, (dict, bool)):
            raise ConstraintError("A JSON schema must be an object.")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(with_json_options(schema)))
        except (ValueError, RuntimeError, TypeError) as exc:
            raise ConstraintError(f"Invalid JSON schema: {_first_line(exc)}") from None
        return cls._checked("json_schema", grammar, retain_state)

    @classmethod
    def json_object(cls) -> "Constraint":
        """Any JSON object (OpenAI's ``json_object`` mode, Ollama's ``format: "json"``)."""
        return cls.from_json_schema({"type": "object"})

    @classmethod
    def from_lark(cls, text: str) -> "Constraint":
        """llguidance's own Lark dialect (it can embed JSON schemas: ``%json {...}``)."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_lark(text)
        except (ValueError, RuntimeError) as exc:
            raise ConstraintError(f"Invalid grammar: {_first_line(exc)}") from None
        return cls._checked("lark", grammar, False)

    @classmethod
    def _checked(cls, kind: str, grammar: str, retain_state: bool) -> "Constraint":
        error = llguidance.LLMatcher.validate_grammar(grammar, None, limits=_LIMITS)
        if error:
            raise ConstraintError(f"Invalid {_KIND_NAMES[kind]}: {_first_line(error)}")
        return cls(kind, grammar, retain_state)


#: ``\uXXXX`` / ``\UXXXXXXXX`` after an even number of backslashes (so not an escaped backslash).
_UNICODE_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\(?:u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8}))")


def _plain_unicode_escapes(text: str) -> str:
    r"""GBNF's ``\u``/``\U`` escapes as characters the converter passes on intact (it drops their
    leading zeros, which the regex engine then misreads: llama.cpp's own json.gbnf has
    ``\U0010FFFF``): ASCII as ``\xHH``, anything else as the character itself."""
    def plain(match: re.Match[str]) -> str:
        code = int(match.group(2) or match.group(3), 16)
        if code < 0x80:
            return f"{match.group(1)}\\x{code:02x}"
        if 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
            return match.group(0)  # no such character: the converter reports it
        return match.group(1) + chr(code)

    return _UNICODE_ESCAPE.sub(plain, text)


#: Pieces of Lark text that are not names: strings, regular expressions, comments.
_LARK_OPAQUE = re.compile(r'"(?:[^"\\]|\\.)*"i?|/(?:[^/\\\n]|\\.)+/[imsx]*|//[^\n]*|#[^\n]*')
_LARK_NAME = re.compile(r"\b[A-Z][A-Z0-9_]*\b")


def _character_level(lark: str) -> str:
    """The converted grammar with its terminals made rules, so it matches character by character
    as GBNF does. (Terminals are lexed greedily: in llama.cpp's arithmetic.gbnf a term's trailing
    whitespace would swallow the newline that must end the line, and nothing could ever end.)"""
    names = set(re.findall(r"^([A-Z][A-Z0-9_]*)\s*:", lark, flags=re.MULTILINE))
    taken = set(re.findall(r"^([a-z_][a-z0-9_]*)\s*:", lark, flags=re.MULTILINE))
    renamed: dict[str, str] = {}
    for name in sorted(names):
        new = "t_" + name.lower()
        while new in taken:
            new += "_"
        renamed[name] = new
        taken.add(new)

    def rename(piece: str) -> str:
        return _LARK_NAME.sub(lambda match: renamed.get(match.group(0), match.group(0)), piece)

    parts, position = [], 0
    for match in _LARK_OPAQUE.finditer(lark):
        parts += [rename(lark[position:match.start()]), match.group(0)]
        position = match.end()
    parts.append(rename(lark[position:]))
    return "".join(parts)


#: Lark text as tokens: strings, regular expressions and comments whole, quantifiers, parentheses.
_LARK_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"i?|/(?:[^/\\\n]|\\.)+/[imsx]*|//[^\n]*|#[^\n]*'
                         r'|\{\d*(?:,\d*)?\}|[+*?()]|\s+|[^\s"/+*?(){}]+|.')


def _is_quantifier(token: str) -> bool:
    return token in ("+", "*", "?") or (token.startswith("{") and token.endswith("}"))


def _group_nested_repetitions(lark: str) -> str:
    """The converted grammar with a repetition of a repetition parenthesized: GBNF's ``(x+)?``
    comes out of the converter as ``x+?``, which Lark refuses."""
    lines = []
    for line in lark.split("\n"):
        tokens = _LARK_TOKEN.findall(line) if not line.startswith("%") else [line]
        index = 1
        while index < len(tokens):
            if _is_quantifier(tokens[index]) and _is_quantifier(tokens[index - 1]):
                start = _operand_start(tokens, index - 2)
                tokens[index:index] = [")"]
                tokens[start:start] = ["("]
                index += 2
            index += 1
        lines.append("".join(tokens))
    return "\n".join(lines)


def _operand_start(tokens: list[str], end: int) -> int:
    """Where the operand ending at ``tokens[end]`` starts (a parenthesized group is one)."""
    depth = 0
    for position in range(end, -1, -1):
        depth += {")": 1, "(": -1}.get(tokens[position], 0)
        if depth == 0:
            return position
    return 0


_KIND_NAMES = {"gbnf": "grammar", "lark": "grammar", "json_schema": "JSON schema"}


def _first_line(error: object) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "not accepted"


class GrammarVocabulary:
    """The model's vocabulary for llguidance, built on first use (about a second) and shared
    by every sequence (a matcher is per sequence; the vocabulary is read-only).

    llguidance is given each token's bytes as the model's own decoder writes them
    (:meth:`Tokenizer.token_bytes`), not the raw ``tokenizer.json``: its own reading of a
    decoder chain takes byte-level tokens of GGUF-converted tokenizers for UTF-8 letters, and
    then masks and text disagree. A token with no bytes of its own is marked special, which no
    text grammar allows.
    """

    def __init__(self, tokenizer: Tokenizer, logits_width: int, stop_ids: list[int]) -> None:
        self._source = tokenizer
        self.width = logits_width
        self.stop_ids = list(stop_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        #: The last finished matcher of a ``retain_state`` grammar, by grammar.
        self._retained: tuple[str, llguidance.LLMatcher] | None = None

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._build()
            return self._tokenizer

    def _build(self) -> llguidance.LLTokenizer:
        eos = self.stop_ids or None
        table = self._source.token_bytes()
        if table is None:  # a decoder not known here: llguidance's own reading is all there is
            log.warning("grammars read the tokenizer by llguidance's own rules")
            return llguidance.LLTokenizer(self._source.to_json(), n_vocab=self.width, eos_token=eos)
        wrapper = llguidance.TokenizerWrapper(_TokenTable(self._source, table, self.stop_ids))
        return llguidance.LLTokenizer(wrapper, n_vocab=self.width, eos_token=eos)

    def guide(self, constraint: Constraint) -> "Guide":
        """A matcher for one sequence; a retained grammar continues from the last one's state."""
        matcher = None
        if constraint.retain_state:
            with self._lock:
                if self._retained is not None and self._retained[0] == constraint.grammar:
                    matcher = self._retained[1].deep_copy()
        if matcher is None:
            matcher = llguidance.LLMatcher(self.tokenizer, constraint.grammar, log_level=0, limits=_LIMITS)
        if matcher.is_error():
            raise ConstraintError(f"Invalid {_KIND_NAMES.get(constraint.kind, 'grammar')}: "
                                  f"{_first_line(matcher.get_error())}")
        return Guide(matcher, self, constraint)

    def encode(self, text: str) -> list[int]:
        """``text`` as tokens the matchers can follow (any tokenization of it will do)."""
        return self._source.encode(text, add_special_tokens=False)

    def retain(self, constraint: Constraint, matcher: llguidance.LLMatcher) -> None:
        with self._lock:
            self._retained = (constraint.grammar, matcher.deep_copy())


class _TokenTable:
    """llguidance's tokenizer protocol (``TokenizerWrapper``) over a token byte table."""

    def __init__(self, tokenizer: Tokenizer, table: list[bytes | None], stop_ids: list[int]) -> None:
        self._encode = tokenizer.encode
        special = set(tokenizer.special_ids)
        special.update(token_id for token_id, value in enumerate(table) if not value)
        self.tokens = [value if value else f"<[{token_id}]>".encode() for token_id, value in enumerate(table)]
        self.special_token_ids = sorted(special)
        self.eos_token_id = stop_ids[0] if stop_ids else None
        self.bos_token_id = None

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text, not bytes")  # llguidance then passes text
        return self._encode(text, add_special_tokens=False)


class Guide:
    """One sequence's grammar state: masks logits, follows chosen tokens, rolls back."""

    def __init__(self, matcher: llguidance.LLMatcher, vocabulary: GrammarVocabulary, constraint: Constraint) -> None:
        self.matcher = matcher
        self.vocabulary = vocabulary
        self.constraint = constraint
        self._bits = np.empty((vocabulary.width + 31) // 32, dtype=np.int32)
        self._start = matcher.deep_copy()

    @property
    def finished(self) -> bool:
        """The grammar admits nothing more: only the end of the generation is left."""
        return self.matcher.is_stopped()

    @property
    def failed(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` with every token the grammar does not allow next set to -inf (a copy)."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        allowed = np.unpackbits(self._bits.view(np.uint8), count=logits.shape[-1], bitorder="little")
        masked = np.array(logits, dtype=np.float32, copy=True)
        masked[allowed == 0] = -np.inf
        return masked

    def consume(self, token: int) -> bool:
        """Follow the chosen token (EOS included); False if the grammar refuses it."""
        return bool(self.matcher.consume_token(token))

    def rollback(self, count: int) -> None:
        if count > 0:
            self.matcher.rollback(count)

    def accepts(self, text: str) -> bool:
        """Whether ``text`` is a complete output of the grammar (from where this sequence
        started): a stop string may end the output there. The text is tokenized afresh; the
        grammar is over bytes, so any tokenization of the same text is judged alike."""
        matcher = self._start.deep_copy()
        return matcher.consume_tokens(self.vocabulary.encode(text)) and matcher.is_accepting()

    def close(self) -> None:
        """The sequence ended: keep the state for a ``retain_state`` grammar's next request."""
        if self.constraint.retain_state and not self.matcher.is_error():
            self.vocabulary.retain(self.constraint, self.matcher)
