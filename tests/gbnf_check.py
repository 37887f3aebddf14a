"""A GBNF subset as a tree, written out as GBNF text, and a recogniser of our own for it.

The differential test generates grammars as trees, sends their GBNF text to the server, and
judges every reply with :class:`Recogniser` on the same tree: independent of llguidance and of
our GBNF conversion. The subset: literals, character classes with ranges and negation, rule
references (to later rules only, so every grammar is finite to recognise), sequences,
alternatives, groups and ``? * +``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class Lit:
    text: str


@dataclass(frozen=True)
class Cls:
    ranges: tuple[tuple[str, str], ...]
    negated: bool = False

    def matches(self, char: str) -> bool:
        inside = any(low <= char <= high for low, high in self.ranges)
        return inside != self.negated


@dataclass(frozen=True)
class Ref:
    name: str


@dataclass(frozen=True)
class Seq:
    items: tuple["Node", ...]


@dataclass(frozen=True)
class Alt:
    options: tuple["Node", ...]


@dataclass(frozen=True)
class Rep:
    item: "Node"
    kind: str  # "?", "*" or "+"


Node = Union[Lit, Cls, Ref, Seq, Alt, Rep]
Grammar = dict[str, Node]  # rule name -> body; "root" first


def _escape(char: str, special: str) -> str:
    named = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\"}
    if char in named:
        return named[char]
    if char in special:
        return "\\" + char
    if ord(char) < 0x20 or ord(char) == 0x7F:
        return f"\\x{ord(char):02X}"
    return char


def render_node(node: Node, nested: bool = False) -> str:
    if isinstance(node, Lit):
        return '"' + "".join(_escape(c, '"') for c in node.text) + '"'
    if isinstance(node, Cls):
        body = "".join(_escape(low, "]^-[") if low == high else f"{_escape(low, ']^-[')}-{_escape(high, ']^-[')}"
                       for low, high in node.ranges)
        return "[" + ("^" if node.negated else "") + body + "]"
    if isinstance(node, Ref):
        return node.name
    if isinstance(node, Rep):
        inner = render_node(node.item, nested=True)
        if isinstance(node.item, (Seq, Alt, Rep)):
            inner = f"({render_node(node.item)})"
        return inner + node.kind
    if isinstance(node, Seq):
        text = " ".join(render_node(item, nested=True) for item in node.items)
        return f"({text})" if nested and len(node.items) > 1 else text
    text = " | ".join(render_node(option) for option in node.options)
    return f"({text})" if nested else text


def render(grammar: Grammar) -> str:
    """GBNF text, one rule a line."""
    return "".join(f"{name} ::= {render_node(body)}\n" for name, body in grammar.items())


class Recogniser:
    """Which ends a text's derivations reach, by sets of positions (so ambiguity and
    backtracking cost nothing): ``complete`` if one derivation of ``root`` covers the whole text,
    ``prefix`` if some derivation runs out of text while it still wants more."""

    def __init__(self, grammar: Grammar) -> None:
        self.grammar = grammar

    def judge(self, text: str) -> str:
        self._text, self._memo, self._wants_more = text, {}, False
        ends = self._ends(self.grammar["root"], 0)
        if len(text) in ends:
            return "complete"
        return "prefix" if self._wants_more else "invalid"

    def _ends(self, node: Node, pos: int) -> frozenset[int]:
        key = (id(node), pos)
        if key not in self._memo:
            self._memo[key] = self._compute(node, pos)
        return self._memo[key]

    def _compute(self, node: Node, pos: int) -> frozenset[int]:
        text = self._text
        if isinstance(node, Lit):
            rest = text[pos:]
            if rest.startswith(node.text):
                return frozenset({pos + len(node.text)})
            if node.text.startswith(rest):
                self._wants_more = True
            return frozenset()
        if isinstance(node, Cls):
            if pos == len(text):
                self._wants_more = True
                return frozenset()
            return frozenset({pos + 1}) if node.matches(text[pos]) else frozenset()
        if isinstance(node, Ref):
            return self._ends(self.grammar[node.name], pos)
        if isinstance(node, Alt):
            return frozenset().union(*(self._ends(option, pos) for option in node.options))
        if isinstance(node, Seq):
            positions = frozenset({pos})
            for item in node.items:
                positions = frozenset().union(*(self._ends(item, p) for p in positions))
            return positions
        first = self._ends(node.item, pos)
        if node.kind == "?":
            return first | {pos}
        reached, frontier = set(first), set(first)
        while frontier:
            frontier = set().union(*(self._ends(node.item, p) for p in frontier)) - reached
            reached |= frontier
        return frozenset(reached | ({pos} if node.kind == "*" else set()))
