"""Phrase bans (KoboldCpp's ``banned_strings``): text the model may never write.

A phrase spans several tokens and is only recognisable once it is complete, so the
generation backtracks: when the text generated so far contains a banned phrase, every
token from the one where the phrase starts is taken back, that token is banned at that
position, and a different token is drawn there from the logits saved for it. Text that
could still turn into a banned phrase is withheld until it cannot, so a client never sees
words that are later taken back.

Matching ignores case (``"Shivers"`` also bans ``"shivers"``), as KoboldCpp's does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .stopping import partial_suffix_length

#: Rewinds allowed per generation: each bans one more token somewhere, so a model that keeps
#: finding new ways into a phrase cannot loop forever (afterwards the phrase is let through).
MAX_REWINDS = 256


@dataclass
class HeldToken:
    """A generated token whose text is still withheld, with what is needed to redraw it."""

    token_id: int
    text: str
    logits: np.ndarray
    #: Decoder state from before this token (see ``IncrementalDecoder.snapshot``).
    decoder_state: tuple[int, int, int]
    banned: set[int] = field(default_factory=set)


@dataclass
class Rewind:
    """Take back the held tokens from ``index`` on; redraw there without the ``banned`` ids."""

    index: int
    banned: set[int]


class PhraseBanGuard:
    """Holds generated tokens back until their text cannot be the start of a banned phrase."""

    def __init__(self, phrases: list[str]) -> None:
        self.phrases = [phrase.lower() for phrase in dict.fromkeys(phrases) if phrase.strip()]
        self.held: list[HeldToken] = []
        self.rewinds = 0

    @property
    def active(self) -> bool:
        return bool(self.phrases) and self.rewinds < MAX_REWINDS

    def add(self, token: HeldToken) -> Rewind | None:
        """Hold ``token``; a :class:`Rewind` when the held text now contains a banned phrase."""
        self.held.append(token)
        if not self.active:
            return None
        text = "".join(held.text for held in self.held).lower()
        starts = [at for at in (text.find(phrase) for phrase in self.phrases) if at != -1]
        if not starts:
            return None
        index = self._token_at(min(starts))
        self.rewinds += 1
        culprit = self.held[index]
        return Rewind(index, culprit.banned | {culprit.token_id})

    def take_back(self, index: int) -> HeldToken:
        """Drop the held tokens from ``index`` on; return the first of them (its logits and
        decoder state are where the redraw starts)."""
        first = self.held[index]
        del self.held[index:]
        return first

    def release(self, final: bool = False) -> str:
        """Text that can no longer become part of a banned phrase (everything when ``final``).

        Only whole tokens are released, so a later rewind never takes back text already sent.
        """
        if final or not self.active:
            text, self.held = "".join(held.text for held in self.held), []
            return text
        text = "".join(held.text for held in self.held).lower()
        keep_from = len(text) - partial_suffix_length(text, self.phrases)
        released = 0
        position = 0
        for held in self.held:
            if position + len(held.text) > keep_from:
                break
            position += len(held.text)
            released += 1
        out = "".join(held.text for held in self.held[:released])
        del self.held[:released]
        return out

    def _token_at(self, offset: int) -> int:
        """Index of the held token whose text covers character ``offset`` (a token with no text
        of its own, an unfinished UTF-8 character, belongs with the token that completes it)."""
        position = 0
        for index, held in enumerate(self.held):
            position += len(held.text)
            if position > offset:
                start = index
                while start > 0 and not self.held[start - 1].text:
                    start -= 1
                return start
        return len(self.held) - 1
