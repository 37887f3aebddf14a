"""PhraseBanGuard on hand-made token streams (the generation-level tests are in test_engine.py)."""

from __future__ import annotations

import numpy as np

from kobold_api.engine.phrase_bans import HeldToken, PhraseBanGuard
from kobold_api.engine.stopping import StopMatcher

LOGITS = np.zeros(4, dtype=np.float32)


def held(token_id: int, text: str) -> HeldToken:
    return HeldToken(token_id, text, LOGITS, (0, 0, 0))


def test_a_phrase_is_caught_at_the_token_where_it_starts() -> None:
    guard = PhraseBanGuard(["Shivers down"])
    assert guard.add(held(1, "It sent ")) is None
    assert guard.release() == "It sent "
    assert guard.add(held(2, "sh")) is None and guard.release() == ""  # could become the phrase
    assert guard.add(held(3, "ivers")) is None and guard.add(held(4, " do")) is None
    rewind = guard.add(held(5, "wn"))
    assert rewind is not None and rewind.index == 0 and rewind.banned == {2}  # case-insensitive


def test_a_phrase_reaching_back_into_released_text_is_caught() -> None:
    guard = PhraseBanGuard(["abc", "dz"])
    for token_id, text in enumerate("abd"):
        assert guard.add(held(token_id, text)) is None
    assert guard.release() == "ab"  # "d" may still become "dz"
    rewind = guard.add(held(9, "z"))
    assert rewind is not None and rewind.index == 0
    guard.take_back(rewind.index)
    again = guard.add(held(7, "c"))  # released "ab" + "c" spells a banned phrase too
    assert again is not None and again.index == 0 and again.banned == {7}


def test_offsets_survive_lower_casing_that_changes_length() -> None:
    guard = PhraseBanGuard(["İstanbul"])  # "İ".lower() is two characters
    assert guard.add(held(1, "İ")) is None
    assert guard.add(held(2, "İ")) is None
    rewind = guard.add(held(3, "stanbul"))
    assert rewind is not None and rewind.index == 1 and rewind.banned == {2}


def test_the_first_bytes_of_a_character_stay_with_it() -> None:
    guard = PhraseBanGuard(["é"])
    assert guard.add(held(1, "x")) is None
    assert guard.add(held(2, "")) is None  # a lead byte: no text yet
    assert guard.release() == "x" and len(guard.held) == 1  # the empty token is not released alone
    rewind = guard.add(held(3, "é"))
    assert rewind is not None and rewind.index == 0 and rewind.banned == {2}


def stop_token(guard: PhraseBanGuard, matcher: StopMatcher) -> int | None:
    """What the generation loop asks: the held token that completes the first stop string."""
    end = matcher.stop_end(guard.held_text)
    return None if end is None else guard.token_ending_at(end)


def test_stop_token_is_the_one_that_completes_the_stop_string() -> None:
    guard = PhraseBanGuard(["XYZ"])
    for token_id, text in enumerate(["a", "X", "Y", "Q"]):
        guard.add(held(token_id, text))
    assert stop_token(guard, StopMatcher(["Y"])) == 2 and stop_token(guard, StopMatcher(["nope"])) is None
    assert stop_token(guard, StopMatcher(["XY"])) == 2  # spans two tokens: both are kept
    assert stop_token(guard, StopMatcher(["YQ", "aXY"])) == 2  # the earliest start wins


def test_a_stop_string_starting_in_text_the_matcher_holds_back_is_found() -> None:
    """The matcher withholds "<|im" (it may become "<|im_end|>"); the held tokens then finish the
    stop string: generation must end at the token that completes it, not run on."""
    matcher = StopMatcher(["<|im_end|>"])
    assert matcher.feed("Sure.<|im").text == "Sure."
    guard = PhraseBanGuard(["never said"])
    for token_id, text in enumerate(["_end", "|>", "\nuser"]):
        guard.add(held(token_id, text))
    assert stop_token(guard, matcher) == 1
    assert matcher.stop_end(guard.held_text) == len("_end|>")


def test_rewinds_are_bounded() -> None:
    guard = PhraseBanGuard(["a"])
    for count in range(300):
        rewind = guard.add(held(count, "a"))
        if rewind is None:
            break
        guard.take_back(rewind.index)
    assert rewind is None and count == 256  # then the phrase is let through instead of looping
    assert guard.release() == "a"
