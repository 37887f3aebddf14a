"""Reasoning ("thinking") blocks: the model's tags, and the budget that closes a block in time.

Reasoning models write their thoughts between tags before they answer (``<think>``/``</think>``
for DeepSeek-R1, Qwen3 and most others; ``[THINK]``/``[/THINK]`` for Mistral's), and their chat
templates often open the block in the generation prompt. KoboldCpp's ``reasoning_effort`` and
``thinking_budget_tokens`` bound how long a block may run: once it holds that many tokens, the
closing tag is written (forced token by token instead of sampled) and the model goes on to answer.
Splitting the finished text into reasoning and answer is the API's business (``api/reasoning.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["THINK_TAGS", "EFFORT_SHARE", "REASONING_EFFORTS", "ThinkFormat", "ThinkLimit", "think_budget"]

#: Tag pairs, in the order a model's chat template is searched for them; the first is the default.
THINK_TAGS: tuple[tuple[str, str], ...] = (("<think>", "</think>"), ("[THINK]", "[/THINK]"))

#: ``reasoning_effort`` as KoboldCpp reads it: the share of the reply's token budget a block may
#: use (``none``: closed at once); ``high`` and ``xhigh`` leave it unbounded.
EFFORT_SHARE: dict[str, float | None] = {"none": 0.0, "minimal": 0.1, "low": 0.25, "medium": 0.5, "high": None,
                                         "xhigh": None}
REASONING_EFFORTS = tuple(EFFORT_SHARE)

#: The tokens a reply may write before its block opens (a newline or two) for the block to count.
_OPENING_SLACK = 2


@dataclass(frozen=True)
class ThinkFormat:
    """A model's reasoning tags, as text and as token ids."""

    start: str
    end: str
    start_ids: tuple[int, ...]
    end_ids: tuple[int, ...]

    @classmethod
    def for_model(cls, chat_template: str | None, encode: Callable[[str], list[int]]) -> ThinkFormat:
        """The pair the model's chat template mentions (``<think>`` when it mentions none)."""
        source = chat_template or ""
        start, end = next(((s, e) for s, e in THINK_TAGS if s in source), THINK_TAGS[0])
        return cls(start, end, tuple(encode(start)), tuple(encode(end)))

    def opened_by(self, prompt: str) -> bool:
        """Whether the prompt ends inside a block it opened (a template that starts the model
        thinking); a template that writes an empty block to turn thinking off ends after it."""
        return prompt.rstrip().endswith(self.start)


def think_budget(effort: str, budget_tokens: int, max_new: int) -> int | None:
    """Tokens a block may hold: ``thinking_budget_tokens`` when sent (>= 0), else the effort's
    share of the reply's ``max_new`` tokens; None: unbounded."""
    if budget_tokens >= 0:
        return budget_tokens
    share = EFFORT_SHARE.get(effort)
    return None if share is None else int(max_new * share)


class ThinkLimit:
    """One reply's reasoning block under a budget: :meth:`forced_token` says which token the reply
    must write next to close it (None: sample as usual).

    Read from the generated tokens each time (a vectorised search, microseconds for thousands of
    tokens) rather than kept as state, so tokens a phrase ban takes back leave nothing stale.
    """

    def __init__(self, think: ThinkFormat, budget: int, opened: bool) -> None:
        self.think = think
        self.budget = max(0, budget)
        self.opened = opened
        self._end = np.asarray(think.end_ids, dtype=np.int64)

    def _body_start(self, reply: np.ndarray) -> int | None:
        """Where the block's text starts in the reply; None when the reply did not open one."""
        if self.opened:
            return 0
        start = self.think.start_ids
        for at in range(min(len(reply) - len(start), _OPENING_SLACK) + 1):
            if tuple(int(token) for token in reply[at:at + len(start)]) == start:
                return at + len(start)
        return None

    def forced_token(self, reply: Sequence[int] | np.ndarray) -> int | None:
        """The next token of the closing tag once the block has used its budget; None otherwise
        (before a block opens, after it closed, or with budget left)."""
        tokens = np.asarray(reply, dtype=np.int64)
        body_start = self._body_start(tokens)
        if body_start is None or not len(self._end):
            return None
        body, end = tokens[body_start:], self._end
        if len(body) >= len(end):
            windows = np.lib.stride_tricks.sliding_window_view(body, len(end))
            if (windows == end).all(axis=1).any():
                return None  # closed
        # A closing tag already under way (forced, or begun by the model) is finished first.
        begun = next((size for size in range(min(len(end) - 1, len(body)), 0, -1)
                      if (body[-size:] == end[:size]).all()), 0)
        if len(body) - begun >= self.budget:
            return int(end[begun])
        return None
