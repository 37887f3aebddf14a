"""The one stop-string matcher: decoded text in, text that is safe to emit out.

Stop strings are matched on decoded text, not tokens, so a stop string split over
several tokens still stops. While streaming, any tail that could still grow into a
stop string is withheld, so a client never sees text that later turns out to be part
of one (a known leak in other servers). Everything else is released at once.

Under a grammar a stop string may only end the text where the grammar could end it: a
``may_end`` callback sees the text the output would then be (after all text released
before) and declines the others, so a JSON reply is never cut inside a string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class StopMatch:
    """Result of one :meth:`StopMatcher.feed`: text to emit, and the stop string hit (if any)."""

    text: str
    stop_string: str | None = None


class StopMatcher:
    """Feed it text deltas in order; it releases text and reports the first stop string."""

    def __init__(self, stop_strings: list[str], trim_stop: bool = True,
                 may_end: Callable[[str], bool] | None = None) -> None:
        self.stop_strings = [s for s in dict.fromkeys(stop_strings) if s]
        self.trim_stop = trim_stop
        #: Whether the output may end with the given text (the released text's continuation).
        self.may_end = may_end
        self._held = ""
        self.stopped: str | None = None

    def feed(self, delta: str) -> StopMatch:
        if self.stopped is not None or not delta:
            return StopMatch("", self.stopped if delta else None)
        buffer = self._held + delta
        if not self.stop_strings:
            self._held = ""
            return StopMatch(buffer)
        hit_at, hit = self._earliest_match(buffer)
        if hit is not None:
            self.stopped = hit
            self._held = ""
            return StopMatch(buffer[:self._end(hit_at, hit)], hit)
        keep = partial_suffix_length(buffer, self.stop_strings)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return StopMatch(buffer[: len(buffer) - keep])

    def stop_end(self, pending: str) -> int | None:
        """Where in ``pending`` (text not fed yet) the first stop string would end, searching the
        withheld text plus ``pending`` as :meth:`feed` will; None if none does. Lets a caller
        that holds tokens back (phrase bans) end generation at the right token."""
        if self.stopped is not None or not self.stop_strings or not pending:
            return None
        at, hit = self._earliest_match(self._held + pending)
        return None if hit is None else at + len(hit) - len(self._held)

    def flush(self) -> str:
        """At the end of generation the withheld tail is ordinary text after all."""
        text, self._held = self._held, ""
        return text

    def _end(self, at: int, hit: str) -> int:
        """Where the output ends for a stop string found at ``at``."""
        return at if self.trim_stop else at + len(hit)

    def _earliest_match(self, buffer: str) -> tuple[int, str | None]:
        """The first stop string in ``buffer`` (the longest of those starting there) that the
        output may end with."""
        every = self.may_end is not None  # without a judge the first place of each is enough
        found = sorted((at, -len(stop), stop) for stop in self.stop_strings
                       for at in _occurrences(buffer, stop, every))
        for at, _, stop in found:
            if self.may_end is None or self.may_end(buffer[:self._end(at, stop)]):
                return at, stop
        return len(buffer), None


def _occurrences(text: str, string: str, every: bool) -> list[int]:
    found, at = [], text.find(string)
    while at != -1:
        found.append(at)
        at = text.find(string, at + 1) if every else -1
    return found


def partial_suffix_length(text: str, strings: list[str]) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of one of ``strings``:
    text that must be withheld because it may still grow into one of them."""
    longest = 0
    for string in strings:
        for length in range(min(len(string) - 1, len(text)), longest, -1):
            if text.endswith(string[:length]):
                longest = length
                break
    return longest
