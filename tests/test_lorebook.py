"""Lorebook activation: keys, case, regex, selective, constant, depth, recursion, budget, order."""

from __future__ import annotations

from kobold_api.chat.character import Lorebook, LorebookEntry
from kobold_api.chat.lorebook import activate_entries, strip_decorators


def count_words(text: str) -> int:
    return len(text.split())


def entry(keys: list[str], content: str, **fields: object) -> LorebookEntry:
    return LorebookEntry(keys=keys, content=content, **fields)  # type: ignore[arg-type]


def activate(entries: list[LorebookEntry], texts: list[str], budget: int = 1000, **book_fields: object):
    book = Lorebook(entries=entries, **book_fields)  # type: ignore[arg-type]
    return activate_entries(book, texts, count_words, budget)


def contents(entries: list[LorebookEntry]) -> list[str]:
    return [e.content for e in entries]


def test_key_match_is_case_insensitive_substring_by_default() -> None:
    before, after = activate([entry(["Dragon"], "Dragons breathe fire.")], ["a DRAGONFLY buzzes"])
    assert contents(before) == ["Dragons breathe fire."]
    assert after == []


def test_no_key_no_activation() -> None:
    assert activate([entry(["dragon"], "Dragons breathe fire.")], ["a quiet day"]) == ([], [])


def test_case_sensitive_entries() -> None:
    lore = entry(["Rose"], "Rose is a knight.", case_sensitive=True)
    assert activate([lore], ["a rose blooms"]) == ([], [])
    assert contents(activate([lore], ["Rose arrives"])[0]) == ["Rose is a knight."]


def test_regex_keys() -> None:
    lore = entry([r"\bcat(s)?\b"], "Cats rule.", use_regex=True)
    assert contents(activate([lore], ["two CATS sat"])[0]) == ["Cats rule."]
    assert activate([lore], ["concatenate"]) == ([], [])
    sensitive = entry([r"^Cat"], "Cats rule.", use_regex=True, case_sensitive=True)
    assert activate([sensitive], ["cat"]) == ([], [])


def test_invalid_regex_does_not_match_and_does_not_raise() -> None:
    lore = entry(["(unclosed"], "Broken.", use_regex=True)
    assert activate([lore], ["(unclosed"]) == ([], [])


def test_literal_keys_are_not_regexes() -> None:
    assert contents(activate([entry(["a.c"], "Dot.")], ["a.c"])[0]) == ["Dot."]
    assert activate([entry(["a.c"], "Dot.")], ["abc"]) == ([], [])


def test_blank_keys_never_match() -> None:
    assert activate([entry(["", "  "], "Everything.")], ["anything at all"]) == ([], [])


def test_disabled_entries_are_ignored_even_if_constant() -> None:
    assert activate([entry(["x"], "Off.", enabled=False, constant=True)], ["x"]) == ([], [])


def test_constant_entries_always_activate() -> None:
    assert contents(activate([entry([], "Always.", constant=True)], [])[0]) == ["Always."]


def test_selective_needs_a_primary_and_a_secondary_key() -> None:
    lore = entry(["sword"], "The sword is cursed.", selective=True, secondary_keys=["curse", "hex"])
    assert activate([lore], ["a sword"]) == ([], [])
    assert activate([lore], ["a hex"]) == ([], [])
    assert contents(activate([lore], ["a sword", "a HEX"])[0]) == ["The sword is cursed."]


def test_selective_without_secondary_keys_behaves_like_plain_entry() -> None:
    lore = entry(["sword"], "Sword.", selective=True)
    assert contents(activate([lore], ["sword"])[0]) == ["Sword."]


def test_only_the_last_scan_depth_texts_are_scanned() -> None:
    lore = entry(["castle"], "The castle is old.")
    texts = ["castle talk", "weather", "new input"]
    assert activate([lore], texts) == ([], [])  # default depth 2
    assert contents(activate([lore], texts, scan_depth=3)[0]) == ["The castle is old."]
    book = Lorebook(entries=[lore])
    assert contents(activate_entries(book, texts, count_words, 100, default_scan_depth=3)[0]) == [
        "The castle is old."
    ]
    assert activate([entry(["input"], "Input.")], texts, scan_depth=0) == ([], [])


def test_recursive_scanning_lets_lore_trigger_lore() -> None:
    entries = [
        entry(["king"], "The king has a daughter named Mira."),
        entry(["mira"], "Mira is a mage."),
        entry(["mage"], "Mages study at the tower."),
    ]
    assert contents(activate(entries, ["the king"])[0]) == ["The king has a daughter named Mira."]
    assert contents(activate(entries, ["the king"], recursive_scanning=True)[0]) == [
        "The king has a daughter named Mira.",
        "Mira is a mage.",
        "Mages study at the tower.",
    ]


def test_order_by_insertion_order_and_split_by_position() -> None:
    entries = [
        entry(["k"], "B late", insertion_order=50),
        entry(["k"], "A after", insertion_order=1, position="after_char"),
        entry(["k"], "B early", insertion_order=5),
        entry(["k"], "A after later", insertion_order=7, position="after_char"),
        entry(["k"], "B same order, later in book", insertion_order=5),
    ]
    before, after = activate(entries, ["k"])
    assert contents(before) == ["B early", "B same order, later in book", "B late"]
    assert contents(after) == ["A after", "A after later"]


def test_over_budget_drops_lowest_priority_first() -> None:
    entries = [
        entry(["k"], "one two three", priority=5, insertion_order=1),
        entry(["k"], "four five", priority=1, insertion_order=2),
        entry(["k"], "six seven eight nine", priority=9, insertion_order=3),
        entry([], "ten", constant=True, priority=3, insertion_order=4),
    ]
    assert contents(activate(entries, ["k"], budget=10)[0]) == [
        "one two three", "four five", "six seven eight nine", "ten"
    ]
    # 10 words > 8: drop priority 1 (2 words) -> 8 fits.
    assert contents(activate(entries, ["k"], budget=8)[0]) == ["one two three", "six seven eight nine", "ten"]
    # > 7: drop priority 1, then priority 3 -> 7.
    assert contents(activate(entries, ["k"], budget=7)[0]) == ["one two three", "six seven eight nine"]
    assert contents(activate(entries, ["k"], budget=4)[0]) == ["six seven eight nine"]
    assert activate(entries, ["k"], budget=0) == ([], [])


def test_equal_priority_drops_the_entry_inserted_lowest() -> None:
    entries = [entry(["k"], "top entry", insertion_order=1), entry(["k"], "bottom entry", insertion_order=9)]
    assert contents(activate(entries, ["k"], budget=2)[0]) == ["top entry"]


def test_decorators_are_stripped_from_content() -> None:
    lore = entry(["k"], "@@depth 4\n@@role system\n@@@fallback x\nThe actual lore.\n@@not a decorator here")
    before, _ = activate([lore], ["k"])
    assert contents(before) == ["The actual lore.\n@@not a decorator here"]
    assert lore.content.startswith("@@depth 4")  # the card's entry is not modified


def test_activate_and_dont_activate_decorators() -> None:
    forced = entry(["never"], "@@activate\nForced.")
    blocked = entry(["k"], "@@dont_activate\nBlocked.", constant=True)
    assert contents(activate([forced, blocked], ["k"])[0]) == ["Forced."]


def test_entries_with_only_decorators_are_skipped() -> None:
    assert activate([entry(["k"], "@@depth 4\n")], ["k"]) == ([], [])


def test_strip_decorators_reports_names() -> None:
    body, names = strip_decorators("@@Depth 4\n@@dont_activate\nText")
    assert body == "Text"
    assert names == frozenset({"depth", "dont_activate"})
    assert strip_decorators("plain") == ("plain", frozenset())
