"""A reasoning model's reply split into its thoughts and its answer, for the chat routes.

OpenAI-style chat completions carry the thoughts as ``reasoning_content`` (DeepSeek's and
KoboldCpp's field, which SillyTavern reads), Ollama's chat as ``message.thinking``; the answer
stays ``content``. A reply counts as thinking when the prompt opened the model's block (its chat
template starts the assistant turn with ``<think>``) or when the reply opens it first thing. The
text up to the closing tag is reasoning, the tags themselves are dropped, and so is the whitespace
around the two parts. Streamed text is split as it comes, a tag cut across chunks included.
"""

from __future__ import annotations

from typing import Any

from ..engine.stopping import partial_suffix_length
from ..engine.thinking import ThinkFormat

__all__ = ["ReasoningSplitter", "split_reasoning", "template_variables"]


class ReasoningSplitter:
    """Feed a reply's text piece by piece; each call returns the ``(reasoning, content)`` text
    that is certain so far (a possible tag, or trailing whitespace of the reasoning, waits)."""

    def __init__(self, think: ThinkFormat, opened: bool) -> None:
        self.think = think
        self._state = "inside" if opened else "before"
        self._held = ""
        self._reasoning_begun = self._content_begun = False
        self.thought = opened

    def feed(self, text: str) -> tuple[str, str]:
        self._held += text
        reasoning = content = ""
        closed = False
        while True:
            if self._state == "before":
                stripped = self._held.lstrip()
                if not stripped or (self.think.start.startswith(stripped) and stripped != self.think.start):
                    break  # only whitespace, or the start of a tag, so far
                if stripped.startswith(self.think.start):
                    self._held, self._state, self.thought = stripped[len(self.think.start):], "inside", True
                else:
                    self._state = "after"
            elif self._state == "inside":
                at = self._held.find(self.think.end)
                if at >= 0:
                    reasoning += self._held[:at]
                    self._held, self._state, closed = self._held[at + len(self.think.end):], "after", True
                    continue
                keep = partial_suffix_length(self._held, [self.think.end])
                body = self._held[:len(self._held) - keep]
                settled = body.rstrip()  # trailing whitespace waits: it is dropped if the tag follows
                reasoning += settled
                self._held = self._held[len(settled):]
                break
            else:
                content += self._held
                self._held = ""
                break
        return self._reasoning(reasoning.rstrip() if closed else reasoning), self._content(content)

    def finish(self) -> tuple[str, str]:
        """What was held back, once the reply has ended."""
        held, self._held = self._held, ""
        if self._state == "inside":
            return self._reasoning(held.rstrip()), ""
        return "", self._content(held.strip() if self._state == "before" else held.rstrip())

    def _reasoning(self, text: str) -> str:
        if not self._reasoning_begun:
            text = text.lstrip()
            self._reasoning_begun = bool(text)
        return text

    def _content(self, text: str) -> str:
        if not self._content_begun:
            text = text.lstrip()
            self._content_begun = bool(text)
        return text


def split_reasoning(text: str, think: ThinkFormat, opened: bool) -> tuple[str | None, str]:
    """A finished reply as ``(reasoning, content)``; when the model did not think, ``(None, text)``
    with the text untouched."""
    splitter = ReasoningSplitter(think, opened)
    reasoning, content = splitter.feed(text)
    more_reasoning, more_content = splitter.finish()
    if not splitter.thought:
        return None, text
    return reasoning + more_reasoning, (content + more_content).rstrip()


def template_variables(chat_template_kwargs: dict[str, Any] | None, reasoning_effort: str) -> dict[str, Any]:
    """What a chat template may read beyond the messages: the client's ``chat_template_kwargs``,
    and ``reasoning_effort`` (templates such as Qwen's read it; ``none`` also sets
    ``enable_thinking`` false, which Qwen3's template answers with an empty block)."""
    variables = dict(chat_template_kwargs or {})
    if reasoning_effort:
        variables.setdefault("reasoning_effort", reasoning_effort)
        if reasoning_effort == "none":
            variables.setdefault("enable_thinking", False)
    return variables
