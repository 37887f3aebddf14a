"""Token log-probabilities in the shapes clients read, for every route family.

* ``content``: OpenAI chat's list of ``{token, logprob, bytes, top_logprobs: [...]}``.
* ``legacy``: OpenAI completions' parallel lists ``tokens``, ``token_logprobs``,
  ``top_logprobs`` (``{token: logprob}``) and ``text_offset``; a prompt's first token has
  ``null`` entries (nothing precedes it).
* ``kobold``: KoboldCpp's object, both of the above in one.

Streams send the logprobs of each event's text with that event (the engine hands them out in
step with the text), so offsets continue from where the previous event ended.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..engine.generation import TokenLogprob
from ..engine.tokenizer import Tokenizer

#: Alternatives per token on the Kobold routes (KoboldCpp 1.117 sends ten).
KOBOLD_TOP_LOGPROBS = 10


class LogprobFormatter:
    """Turns the engine's :class:`TokenLogprob` lists into wire shapes."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def text(self, token_id: int) -> str:
        """The token's text as it reads inside the reply (part of a character: U+FFFD)."""
        return self.tokenizer.token_piece(token_id).decode("utf-8", errors="replace")

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        piece = self.tokenizer.token_piece(token_id)
        return {"token": piece.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(piece)}

    def content(self, items: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
        return [{**self._entry(item.token_id, item.logprob),
                 "top_logprobs": [self._entry(token, logprob) for token, logprob in item.top]} for item in items]

    def legacy(self, items: Sequence[TokenLogprob | None], offset: int = 0,
               token_ids: Sequence[int] | None = None) -> dict[str, Any]:
        """The completions shape; ``token_ids`` name the tokens where an item is None (a
        prompt's first token); ``offset``: characters of text before the first token."""
        tokens, logprobs, tops, offsets = [], [], [], []
        for index, item in enumerate(items):
            token_id = item.token_id if item is not None else (token_ids[index] if token_ids else 0)
            text = self.text(token_id)
            tokens.append(text)
            logprobs.append(item.logprob if item is not None else None)
            tops.append({self.text(t): lp for t, lp in item.top} if item is not None else None)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}

    def kobold(self, items: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
        return {"content": self.content(items), **self.legacy(items, offset)}
