"""Phrase bans (KoboldCpp's ``banned_strings``): text the model may never write.

A phrase spans several tokens and is only recognisable once it is complete, so the
generation backtracks: when the text generated so far contains a banned phrase, every
token from the one where the phrase starts is taken back, that token is banned at that
position, and a different token is drawn there from the logits saved for it. Text that
could still turn into a banned phrase is withheld until it cannot, so a client never sees
words that are later taken back.

Matching ignores case (``"Shivers"`` also bans ``"shivers"``), as KoboldCpp's does. All
offsets are taken in the lower-cased text, token by token, since lower-casing can change a
string's length (``"İ"`` becomes two characters).
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
    #: ``text`` lower-cased, once: the matching reads it on every step while the token is held.
    folded: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.folded = self.text.lower()


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
        #: The end of the released text, as long as a phrase could reach back into it.
        self._released_tail = ""
        self._tail_length = max((len(phrase) for phrase in self.phrases), default=1) - 1

    @property
    def active(self) -> bool:
        return bool(self.phrases) and self.rewinds < MAX_REWINDS

    def add(self, token: HeldToken) -> Rewind | None:
        """Hold ``token``; a :class:`Rewind` when the text now contains a banned phrase.

        A phrase that begins in text already released cannot be taken back there, so the
        first held token (the first one that is still ours to change) is redrawn instead.
        """
        self.held.append(token)
        if not self.active:
            return None
        text = self._released_tail + "".join(held.folded for held in self.held)
        starts = [at for at in (text.find(phrase) for phrase in self.phrases) if at != -1]
        if not starts:
            return None
        index = self._token_at(max(min(starts) - len(self._released_tail), 0))
        self.rewinds += 1
        culprit = self.held[index]
        return Rewind(index, culprit.banned | {culprit.token_id})

    @property
    def held_text(self) -> str:
        return "".join(held.text for held in self.held)

    def token_ending_at(self, end: int) -> int:
        """Index of the held token whose text holds character ``end - 1`` of :attr:`held_text`
        (the token that completes a stop string ending there)."""
        position = 0
        for index, held in enumerate(self.held):
            position += len(held.text)
            if position >= end:
                return index
        return len(self.held) - 1

    def take_back(self, index: int) -> HeldToken:
        """Drop the held tokens from ``index`` on; return the first of them (its logits and
        decoder state are where the redraw starts)."""
        first = self.held[index]
        del self.held[index:]
        return first

    def release(self, final: bool = False) -> str:
        """Text that can no longer become part of a banned phrase (everything when ``final``).

        Only whole tokens are released, never one whose text is still empty (the first bytes
        of a character: the token that completes it may yet be taken back), so a later rewind
        never takes back text already sent.
        """
        if final or not self.active:
            text, self.held = "".join(held.text for held in self.held), []
            return text
        folded = self._released_tail + "".join(held.folded for held in self.held)
        keep_from = len(folded) - partial_suffix_length(folded, self.phrases) - len(self._released_tail)
        released, position = 0, 0
        for held in self.held:
            if position + len(held.folded) > keep_from:
                break
            position += len(held.folded)
            released += 1
        while released and not self.held[released - 1].text:
            released -= 1
        out = self.held[:released]
        del self.held[:released]
        tail = self._released_tail + "".join(held.folded for held in out)
        self._released_tail = tail[-self._tail_length:] if self._tail_length else ""
        return "".join(held.text for held in out)

    def _token_at(self, offset: int) -> int:
        """Index of the held token whose (folded) text covers ``offset`` (a token with no text
        of its own, an unfinished character, belongs with the token that completes it)."""
        position = 0
        for index, held in enumerate(self.held):
            position += len(held.folded)
            if position > offset:
                start = index
                while start > 0 and not self.held[start - 1].text:
                    start -= 1
                return start
        return len(self.held) - 1
