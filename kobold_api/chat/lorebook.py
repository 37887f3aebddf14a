"""Lorebook (world info) activation: which entries of a card's book go into this prompt.

Follows the Character Card V2/V3 rules: keys are looked for in the most recent
messages, ``constant`` entries are always in, ``selective`` entries also need a
secondary key, lower ``insertion_order`` is inserted higher, and when the token
budget is exceeded the lowest ``priority`` is dropped first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable

from kobold_api.chat.character import Lorebook, LorebookEntry

__all__ = ["activate_entries", "strip_decorators"]


def strip_decorators(content: str) -> tuple[str, frozenset[str]]:
    """Split V3 ``@@decorator`` lines (and ``@@@`` fallbacks) off the top of ``content``.

    Decorators steer activation and must never reach the model. Returns the remaining
    text (stripped) and the lower-cased decorator names that were present.
    """
    lines = content.split("\n")
    names: set[str] = set()
    first_body_line = 0
    for line in lines:
        stripped = line.strip()
        if not stripped.startswith("@@"):
            break
        names.add(stripped.lstrip("@").split(" ", 1)[0].lower())
        first_body_line += 1
    return "\n".join(lines[first_body_line:]).strip(), frozenset(names)


@dataclass(frozen=True)
class _Candidate:
    """An enabled entry with its decorator-free text, remembered with its book position."""

    index: int
    entry: LorebookEntry
    body: str
    decorators: frozenset[str]


def _key_matcher(key: str, entry: LorebookEntry) -> Callable[[str], bool] | None:
    """A predicate for one key, or None for keys that can never match (blank, bad regex)."""
    if not key.strip():
        return None
    if entry.use_regex:
        try:
            pattern = re.compile(key, 0 if entry.case_sensitive else re.IGNORECASE)
        except re.error:
            return None  # V3: an invalid regex simply does not match
        return lambda text: pattern.search(text) is not None
    if entry.case_sensitive:
        return lambda text: key in text
    folded_key = key.casefold()
    return lambda text: folded_key in text.casefold()


def _any_key_in(keys: list[str], entry: LorebookEntry, texts: list[str]) -> bool:
    """Whether any of ``keys`` occurs in any of ``texts`` (each message checked on its own)."""
    for key in keys:
        matcher = _key_matcher(key, entry)
        if matcher is not None and any(matcher(text) for text in texts):
            return True
    return False


def _is_triggered(candidate: _Candidate, texts: list[str]) -> bool:
    """Activation for one entry: decorators, then ``constant``, then keys (+ secondary keys)."""
    entry = candidate.entry
    if "dont_activate" in candidate.decorators:
        return False
    if entry.constant or "activate" in candidate.decorators:
        return True
    if not _any_key_in(entry.keys, entry, texts):
        return False
    if entry.selective and entry.secondary_keys:
        return _any_key_in(entry.secondary_keys, entry, texts)
    return True


def activate_entries(
    book: Lorebook,
    scan_texts: list[str],
    count_tokens: Callable[[str], int],
    budget_tokens: int,
    default_scan_depth: int = 2,
) -> tuple[list[LorebookEntry], list[LorebookEntry]]:
    """Entries to insert (before the character definition, after it), in insertion order.

    ``scan_texts`` are message texts, oldest first, the new user input last; only the
    last ``book.scan_depth`` (else ``default_scan_depth``) of them are scanned, so the
    new input counts as one of them, as in SillyTavern. With ``recursive_scanning``
    activated content is scanned too, until nothing new activates. Returned entries are
    copies whose ``content`` has the decorators stripped.
    """
    depth = book.scan_depth if book.scan_depth is not None else default_scan_depth
    buffer = list(scan_texts[-depth:]) if depth > 0 else []

    candidates: list[_Candidate] = []
    for index, entry in enumerate(book.entries):
        if not entry.enabled:
            continue
        body, decorators = strip_decorators(entry.content)
        if body:
            candidates.append(_Candidate(index, entry, body, decorators))

    active: dict[int, _Candidate] = {}
    while True:
        newly_active = [c for c in candidates if c.index not in active and _is_triggered(c, buffer)]
        if not newly_active:
            break
        active.update((c.index, c) for c in newly_active)
        if not book.recursive_scanning:
            break
        buffer = buffer + [c.body for c in newly_active]

    kept = _fit_budget(list(active.values()), count_tokens, budget_tokens)
    kept.sort(key=lambda c: (c.entry.insertion_order, c.index))
    before = [replace(c.entry, content=c.body) for c in kept if c.entry.position != "after_char"]
    after = [replace(c.entry, content=c.body) for c in kept if c.entry.position == "after_char"]
    return before, after


def _fit_budget(
    active: list[_Candidate], count_tokens: Callable[[str], int], budget_tokens: int
) -> list[_Candidate]:
    """Drop the lowest ``priority`` first (ties: the one inserted lowest) until under budget."""
    sizes = {c.index: count_tokens(c.body) for c in active}
    total = sum(sizes.values())
    # Most expendable first: low priority, then high insertion_order, then later in the book.
    drop_order = sorted(active, key=lambda c: (c.entry.priority, -c.entry.insertion_order, -c.index))
    dropped: set[int] = set()
    for candidate in drop_order:
        if total <= budget_tokens:
            break
        dropped.add(candidate.index)
        total -= sizes[candidate.index]
    return [c for c in active if c.index not in dropped]
