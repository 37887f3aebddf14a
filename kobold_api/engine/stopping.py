"""The one stop-string matcher: decoded text in, text that is safe to emit out.

Stop strings are matched on decoded text, not tokens, so a stop string split over
several tokens still stops. While streaming, any tail that could still grow into a
stop string is withheld, so a client never sees text that later turns out to be part
of one (a known leak in other servers). Everything else is released at once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StopMatch:
    """Result of one :meth:`StopMatcher.feed`: text to emit, and the stop string hit (if any)."""

    text: str
    stop_string: str | None = None


class StopMatcher:
    """Feed it text deltas in order; it releases text and reports the first stop string."""

    def __init__(self, stop_strings: list[str], trim_stop: bool = True) -> None:
        self.stop_strings = [s for s in dict.fromkeys(stop_strings) if s]
        self.trim_stop = trim_stop
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
            end = hit_at if self.trim_stop else hit_at + len(hit)
            return StopMatch(buffer[:end], hit)
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

    def _earliest_match(self, buffer: str) -> tuple[int, str | None]:
        best_at, best = len(buffer), None
        for stop in self.stop_strings:
            at = buffer.find(stop)
            if at != -1 and (at < best_at or (at == best_at and best is not None and len(stop) > len(best))):
                best_at, best = at, stop
        return best_at, best


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
