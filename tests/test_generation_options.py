"""The generation options every route family shares are read the same way on every route:
the same spellings, the same lenient forms, the same bounds (they once drifted apart)."""

from __future__ import annotations

from typing import Any, Callable

import pytest

from kobold_api.api.chat.schemas import parse_chat_input
from kobold_api.api.errors import ValidationError
from kobold_api.api.generation_options import MAX_N, MAX_STOP_STRINGS
from kobold_api.api.kobold.schemas import parse_generation_input
from kobold_api.api.openai.schemas import parse_chat_completion, parse_completion
from kobold_api.settings import GenerationDefaults

DEFAULTS = GenerationDefaults()
#: Each route's parser with the smallest body it accepts; returns (stop strings, ban_eos).
ROUTES: dict[str, Callable[[dict[str, Any]], tuple[list[str], bool]]] = {
    "kobold": lambda body: (lambda p: (p.stop_strings, p.ban_eos))(
        parse_generation_input({"prompt": "hi", **body}, DEFAULTS)),
    "openai completions": lambda body: (lambda p: (p.stop, p.ban_eos))(
        parse_completion({"prompt": "hi", **body}, DEFAULTS)),
    "openai chat": lambda body: (lambda p: (p.stop, p.ban_eos))(
        parse_chat_completion({"messages": [{"role": "user", "content": "hi"}], **body}, DEFAULTS)),
    "chat": lambda body: (lambda p: (p.stop_strings, p.ban_eos))(
        parse_chat_input({"user_input": "hi", **body}, DEFAULTS)),
}


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("body, expected", [
    ({"stop_sequence": ["\nYou:"]}, ["\nYou:"]),
    ({"stop": "END"}, ["END"]),
    ({"stop": ["A", "B"]}, ["A", "B"]),
    ({"stopping_strings": ["X"]}, ["X"]),
    ({"custom_stopping_strings": '"\\nUser:", "###"'}, ["\nUser:", "###"]),
    ({"stop_sequence": '["\\n\\n"]'}, ["\n\n"]),  # SillyTavern's JSON-encoded list
    ({"stop_sequence": ["A", "", "A"], "stop": ["B", "A"]}, ["A", "B"]),  # merged, de-duplicated
])
def test_stop_strings_from_every_spelling_on_every_route(route: str, body: dict[str, Any],
                                                          expected: list[str]) -> None:
    assert ROUTES[route](body)[0] == expected


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("name", ["ban_eos_token", "use_default_badwordsids", "bypass_eos", "ignore_eos"])
def test_every_eos_ban_spelling_on_every_route(route: str, name: str) -> None:
    assert ROUTES[route]({name: True})[1] is True
    assert ROUTES[route]({name: "False"})[1] is False


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_the_same_bounds_on_every_route(route: str) -> None:
    with pytest.raises(ValidationError) as refused:
        ROUTES[route]({"stop": [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]})
    assert "stop_sequence" in refused.value.errors
    if route != "chat":  # one reply per chat turn: no n there
        with pytest.raises(ValidationError) as refused:
            ROUTES[route]({"n": MAX_N + 1})
        assert "n" in refused.value.errors
        ROUTES[route]({"n": MAX_N})
