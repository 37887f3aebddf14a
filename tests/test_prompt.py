"""The prompt builder: exact prompts per mode, tails, stop strings, fitting, lore, clean-up."""

from __future__ import annotations

import pytest

from kobold_api.chat.character import Character, Lorebook, LorebookEntry
from kobold_api.chat.prompt import (
    ChatMessage,
    PromptBuilder,
    PromptBuildError,
    PromptRequest,
    PromptTooLongError,
    clean_reply,
    replace_macros,
    split_examples,
)
from kobold_api.chat.templates import JinjaChatTemplate, get_named_template

CHATML = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def count_words(text: str) -> int:
    """A deterministic stand-in tokenizer: one token per whitespace-separated word."""
    return len(text.split())


def make_card(**overrides: object) -> Character:
    fields: dict[str, object] = {
        "name": "Alice",
        "description": "{{char}} is a witch who lives with <USER>.",
        "personality": "Curious and kind.",
        "scenario": "{{User}} visits {{CHAR}}'s tavern.",
        "mes_example": "<START>\n{{user}}: Hi!\n{{char}}: Hello, {{user}}.\n<start>\n<user>: Spells?\n<BOT>: Many.",
    }
    fields.update(overrides)
    return Character(**fields)  # type: ignore[arg-type]


HISTORY = [
    ChatMessage("character", "Welcome to my tavern!"),
    ChatMessage("user", "Thanks."),
    ChatMessage("character", "What brings you here?"),
]


def make_builder() -> PromptBuilder:
    return PromptBuilder(count_words, JinjaChatTemplate(CHATML))


def build(**overrides: object):
    request_fields: dict[str, object] = {
        "character": make_card(),
        "user_name": "Bob",
        "history": HISTORY,
        "user_input": "A rumor.",
        "max_prompt_tokens": 1000,
    }
    request_fields.update(overrides)
    return make_builder().build(PromptRequest(**request_fields))  # type: ignore[arg-type]


CHAT_PROMPT = (
    "Alice is a witch who lives with Bob.\n"
    "Alice's personality: Curious and kind.\n"
    "Scenario: Bob visits Alice's tavern.\n"
    "***\n"
    "Bob: Hi!\n"
    "Alice: Hello, Bob.\n"
    "***\n"
    "Bob: Spells?\n"
    "Alice: Many.\n"
    "***\n"
    "Alice: Welcome to my tavern!\n"
    "Bob: Thanks.\n"
    "Alice: What brings you here?\n"
    "Bob: A rumor.\n"
    "Alice:"
)

INSTRUCT_SYSTEM = (
    "<|im_start|>system\n"
    "Alice is a witch who lives with Bob.\n"
    "Alice's personality: Curious and kind.\n"
    "Scenario: Bob visits Alice's tavern.\n"
    "***\n"
    "Bob: Hi!\n"
    "Alice: Hello, Bob.\n"
    "***\n"
    "Bob: Spells?\n"
    "Alice: Many.<|im_end|>\n"
)

INSTRUCT_PROMPT = (
    INSTRUCT_SYSTEM
    + "<|im_start|>assistant\nWelcome to my tavern!<|im_end|>\n"
    "<|im_start|>user\nThanks.<|im_end|>\n"
    "<|im_start|>assistant\nWhat brings you here?<|im_end|>\n"
    "<|im_start|>user\nA rumor.<|im_end|>\n"
    "<|im_start|>assistant\n"
)

CHAT_INSTRUCT_PROMPT = (
    "<|im_start|>user\n"
    'Continue the chat dialogue below. Write a single reply for the character "Alice".\n'
    "\n"
    "Alice is a witch who lives with Bob.\n"
    "Alice's personality: Curious and kind.\n"
    "Scenario: Bob visits Alice's tavern.\n"
    "***\n"
    "Bob: Hi!\n"
    "Alice: Hello, Bob.\n"
    "***\n"
    "Bob: Spells?\n"
    "Alice: Many.\n"
    "***\n"
    "Alice: Welcome to my tavern!\n"
    "Bob: Thanks.\n"
    "Alice: What brings you here?\n"
    "Bob: A rumor.<|im_end|>\n"
    "<|im_start|>assistant\n"
    "Alice:"
)


# --- exact prompts per mode ---------------------------------------------------------


def test_chat_mode_prompt() -> None:
    built = build()
    assert built.text == CHAT_PROMPT
    assert built.speaker == "Alice"
    assert built.prompt_tokens == count_words(CHAT_PROMPT)
    assert built.dropped_turns == 0
    assert built.dropped_examples == 0
    assert built.activated_lore == []
    assert built.stop_strings == ["\nBob:", "\nAlice:", "\n***"]


def test_instruct_mode_prompt() -> None:
    built = build(mode="instruct")
    assert built.text == INSTRUCT_PROMPT
    assert built.stop_strings == ["\nBob:", "\nAlice:", "\n***", "<|im_end|>", "<|im_start|>user"]


def test_chat_instruct_mode_prompt() -> None:
    built = build(mode="chat-instruct")
    assert built.text == CHAT_INSTRUCT_PROMPT
    assert built.stop_strings == ["\nBob:", "\nAlice:", "\n***", "<|im_end|>", "<|im_start|>user"]


def test_custom_chat_instruct_command() -> None:
    built = build(
        mode="chat-instruct",
        history=[],
        character=make_card(mes_example="", personality="", scenario=""),
        chat_instruct_command="Reply as <|character|> to {{user}}:\n<|prompt|>",
    )
    assert built.text == (
        "<|im_start|>user\nReply as Alice to Bob:\n"
        "Alice is a witch who lives with Bob.\n***\nBob: A rumor.<|im_end|>\n"
        "<|im_start|>assistant\nAlice:"
    )


def test_chat_instruct_command_without_prompt_placeholder_still_includes_the_chat() -> None:
    built = build(
        mode="chat-instruct",
        history=[],
        character=make_card(mes_example="", personality="", scenario=""),
        chat_instruct_command="Write Alice's reply.",
    )
    assert "Write Alice's reply.\n\nAlice is a witch who lives with Bob.\n***\nBob: A rumor.<|im_end|>" in built.text


def test_request_template_overrides_builder_template() -> None:
    alpaca = get_named_template("Alpaca")
    built = build(mode="instruct", history=[], template=alpaca, character=make_card(mes_example=""))
    assert built.text == (
        "Alice is a witch who lives with Bob.\n"
        "Alice's personality: Curious and kind.\n"
        "Scenario: Bob visits Alice's tavern.\n\n"
        "### Instruction:\nA rumor.\n\n### Response:\n"
    )
    assert "### Instruction:" in built.stop_strings
    assert "<|im_end|>" not in built.stop_strings


def test_chat_mode_with_empty_fields_skips_their_lines() -> None:
    card = Character(name="Alice")
    built = build(character=card, history=[])
    assert built.text == "***\nBob: A rumor.\nAlice:"


def test_system_prompt_and_post_history_instructions_in_chat_mode() -> None:
    card = make_card(
        system_prompt="You are {{char}}. {{original}}",
        post_history_instructions="{{ORIGINAL}}Stay in character as {{char}}.",
        mes_example="",
    )
    built = build(character=card, history=[HISTORY[-1]])
    assert built.text == (
        "You are Alice.\n"
        "Alice is a witch who lives with Bob.\n"
        "Alice's personality: Curious and kind.\n"
        "Scenario: Bob visits Alice's tavern.\n"
        "***\n"
        "Alice: What brings you here?\n"
        "Bob: A rumor.\n"
        "Stay in character as Alice.\n"
        "Alice:"
    )


def test_post_history_instructions_in_instruct_mode_join_the_last_user_turn() -> None:
    card = Character(name="Alice", description="A witch.", post_history_instructions="Be brief.")
    built = build(character=card, mode="instruct", history=[HISTORY[-1]])
    assert built.text == (
        "<|im_start|>system\nA witch.<|im_end|>\n"
        "<|im_start|>assistant\nWhat brings you here?<|im_end|>\n"
        "<|im_start|>user\nA rumor.\n\nBe brief.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Without new input the instructions become a user turn of their own.
    regenerated = build(character=card, mode="instruct", history=[HISTORY[-1]], user_input=None)
    assert regenerated.text.endswith(
        "<|im_start|>assistant\nWhat brings you here?<|im_end|>\n"
        "<|im_start|>user\nBe brief.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_regenerate_without_user_input_ends_with_character_line() -> None:
    built = build(character=Character(name="Alice"), history=HISTORY[:2], user_input=None)
    assert built.text == "***\nAlice: Welcome to my tavern!\nBob: Thanks.\nAlice:"


def test_blank_history_messages_are_skipped() -> None:
    history = [ChatMessage("user", "  "), ChatMessage("character", " Hi. ")]
    built = build(character=Character(name="Alice"), history=history, user_input="  ")
    assert built.text == "***\nAlice: Hi.\nAlice:"


# --- continue / impersonate ----------------------------------------------------------

SIMPLE_CARD = Character(name="Alice", description="A witch.")


def test_continue_in_chat_mode_ends_with_the_unterminated_last_message() -> None:
    history = [*HISTORY[:2], ChatMessage("character", "Well, I was")]
    built = build(character=SIMPLE_CARD, history=history, continue_last=True, user_input="ignored")
    assert built.text == "A witch.\n***\nAlice: Welcome to my tavern!\nBob: Thanks.\nAlice: Well, I was"
    assert built.speaker == "Alice"


def test_continue_keeps_the_continued_text_exactly() -> None:
    history = [ChatMessage("character", "Trailing space ")]
    built = build(character=SIMPLE_CARD, history=history, continue_last=True)
    assert built.text.endswith("Alice: Trailing space ")


def test_continue_a_user_message_swaps_speaker_and_stops() -> None:
    history = [HISTORY[0], ChatMessage("user", "I think")]
    built = build(character=SIMPLE_CARD, history=history, continue_last=True)
    assert built.text == "A witch.\n***\nAlice: Welcome to my tavern!\nBob: I think"
    assert built.speaker == "Bob"
    assert built.stop_strings[:2] == ["\nAlice:", "\nBob:"]


def test_continue_in_instruct_mode_cuts_the_end_of_turn() -> None:
    history = [*HISTORY[:2], ChatMessage("character", "Well, I was")]
    built = build(character=SIMPLE_CARD, history=history, continue_last=True, mode="instruct")
    assert built.text == (
        "<|im_start|>system\nA witch.<|im_end|>\n"
        "<|im_start|>assistant\nWelcome to my tavern!<|im_end|>\n"
        "<|im_start|>user\nThanks.<|im_end|>\n"
        "<|im_start|>assistant\nWell, I was"
    )


def test_continue_in_chat_instruct_mode() -> None:
    history = [HISTORY[1], ChatMessage("character", "Well, I was")]
    built = build(character=SIMPLE_CARD, history=history, continue_last=True, mode="chat-instruct")
    assert built.text == (
        "<|im_start|>user\n"
        'Continue the chat dialogue below. Write a single reply for the character "Alice".\n\n'
        "A witch.\n***\nBob: Thanks.<|im_end|>\n"
        "<|im_start|>assistant\nAlice: Well, I was"
    )


def test_continue_with_empty_history_is_an_error() -> None:
    with pytest.raises(PromptBuildError, match="continue"):
        build(history=[], continue_last=True)


def test_impersonate_in_chat_mode() -> None:
    built = build(character=SIMPLE_CARD, history=HISTORY[1:], impersonate=True, user_input=None)
    assert built.text == "A witch.\n***\nBob: Thanks.\nAlice: What brings you here?\nBob:"
    assert built.speaker == "Bob"
    assert built.stop_strings == ["\nAlice:", "\nBob:", "\n***"]


def test_impersonate_with_input_continues_the_users_line() -> None:
    built = build(character=SIMPLE_CARD, history=HISTORY[2:], impersonate=True, user_input="I heard")
    assert built.text == "A witch.\n***\nAlice: What brings you here?\nBob: I heard"


def test_impersonate_leaves_out_post_history_instructions() -> None:
    card = Character(name="Alice", post_history_instructions="Stay in character.")
    built = build(character=card, history=HISTORY[2:], impersonate=True, user_input=None)
    assert built.text == "***\nAlice: What brings you here?\nBob:"


def test_impersonate_in_instruct_mode_opens_a_user_turn() -> None:
    built = build(character=SIMPLE_CARD, history=HISTORY[2:], impersonate=True, user_input=None, mode="instruct")
    assert built.text == (
        "<|im_start|>system\nA witch.<|im_end|>\n"
        "<|im_start|>assistant\nWhat brings you here?<|im_end|>\n"
        "<|im_start|>user\n"
    )
    assert built.stop_strings == [
        "\nAlice:", "\nBob:", "\n***", "<|im_end|>", "<|im_start|>user", "<|im_start|>assistant"
    ]


def test_impersonate_in_chat_instruct_mode_names_the_user() -> None:
    built = build(character=SIMPLE_CARD, history=HISTORY[2:], impersonate=True, user_input=None, mode="chat-instruct")
    assert built.text == (
        "<|im_start|>user\n"
        'Continue the chat dialogue below. Write a single reply for the character "Bob".\n\n'
        "A witch.\n***\nAlice: What brings you here?<|im_end|>\n"
        "<|im_start|>assistant\nBob:"
    )


# --- stop strings -------------------------------------------------------------------


def test_extra_stop_strings_are_added_deduplicated_and_non_empty() -> None:
    built = build(extra_stop_strings=["\nBob:", "", "THE END", "THE END", "\n"])
    assert built.stop_strings == ["\nBob:", "\nAlice:", "\n***", "THE END", "\n"]


def test_stop_strings_use_the_display_name() -> None:
    built = build(character=make_card(nickname="Ally"), history=[])
    assert built.stop_strings[:2] == ["\nBob:", "\nAlly:"]
    assert built.text.startswith("Ally is a witch who lives with Bob.\n")
    assert built.text.endswith("Bob: A rumor.\nAlly:")


# --- macros -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("{{char}} and {{user}}", "Alice and Bob"),
        ("{{CHAR}} and {{User}}", "Alice and Bob"),
        ("<BOT>, <bot>, <Char>, <USER>, <user>", "Alice, Alice, Alice, Bob, Bob"),
        ("{{ char }} stays", "{{ char }} stays"),
        ("<|user|> is a role token", "<|user|> is a role token"),
    ],
)
def test_replace_macros(raw: str, expected: str) -> None:
    assert replace_macros(raw, "Alice", "Bob") == expected


def test_macro_replacement_keeps_special_characters_in_names_literal() -> None:
    assert replace_macros("{{user}}", "Alice", r"B\1ob") == r"B\1ob"


def test_macros_in_history_are_replaced() -> None:
    history = [ChatMessage("character", "Hi {{USER}}!")]
    built = build(character=Character(name="Alice"), history=history, user_input=None)
    assert built.text == "***\nAlice: Hi Bob!\nAlice:"


@pytest.mark.parametrize(
    ("raw", "blocks"),
    [
        ("", []),
        ("<START>", []),
        ("  <start>\n\n", []),
        ("Bob: hi\nAlice: hey", ["Bob: hi\nAlice: hey"]),
        ("<START>\nA\n<Start>\n\n<START>\nB\n", ["A", "B"]),
    ],
)
def test_split_examples(raw: str, blocks: list[str]) -> None:
    assert split_examples(raw) == blocks


# --- fitting the budget -------------------------------------------------------------


def test_full_prompt_size_used_by_the_fitting_tests() -> None:
    assert count_words(CHAT_PROMPT) == 46


def test_over_budget_drops_the_last_example_block_first() -> None:
    built = build(max_prompt_tokens=44)
    assert built.text == (
        "Alice is a witch who lives with Bob.\n"
        "Alice's personality: Curious and kind.\n"
        "Scenario: Bob visits Alice's tavern.\n"
        "***\n"
        "Bob: Hi!\n"
        "Alice: Hello, Bob.\n"
        "***\n"
        "Alice: Welcome to my tavern!\n"
        "Bob: Thanks.\n"
        "Alice: What brings you here?\n"
        "Bob: A rumor.\n"
        "Alice:"
    )
    assert (built.dropped_examples, built.dropped_turns, built.prompt_tokens) == (1, 0, 41)


def test_all_examples_go_before_any_turn() -> None:
    built = build(max_prompt_tokens=40)
    assert (built.dropped_examples, built.dropped_turns, built.prompt_tokens) == (2, 0, 35)
    assert "Spells" not in built.text and "Hi!" not in built.text
    assert "Alice: Welcome to my tavern!\n" in built.text


def test_then_the_oldest_turns_are_dropped_keeping_definition_and_input() -> None:
    built = build(max_prompt_tokens=27)
    assert built.text == (
        "Alice is a witch who lives with Bob.\n"
        "Alice's personality: Curious and kind.\n"
        "Scenario: Bob visits Alice's tavern.\n"
        "***\n"
        "Bob: A rumor.\n"
        "Alice:"
    )
    assert (built.dropped_examples, built.dropped_turns, built.prompt_tokens) == (2, 3, 23)
    one_dropped = build(max_prompt_tokens=30, turn_block_fraction=0)  # as few as fit
    assert (one_dropped.dropped_turns, one_dropped.prompt_tokens) == (1, 30)
    assert "Welcome" not in one_dropped.text and "Bob: Thanks.\n" in one_dropped.text


def test_too_long_even_without_examples_and_history_raises_with_numbers() -> None:
    with pytest.raises(PromptTooLongError) as raised:
        build(max_prompt_tokens=22)
    assert (raised.value.prompt_tokens, raised.value.max_prompt_tokens) == (23, 22)
    assert "23" in str(raised.value) and "22" in str(raised.value)


def test_instruct_mode_fitting_drops_examples_then_turns() -> None:
    full = build(mode="instruct")
    built = build(mode="instruct", max_prompt_tokens=full.prompt_tokens - 1)
    assert built.dropped_examples == 1 and built.dropped_turns == 0
    assert "Spells" not in built.text and "Hi!" in built.text
    tight = build(mode="instruct", max_prompt_tokens=full.prompt_tokens - 12)
    assert tight.dropped_examples == 2 and tight.dropped_turns >= 1
    assert tight.text.startswith("<|im_start|>system\nAlice is a witch who lives with Bob.\n")
    assert tight.text.endswith("<|im_start|>user\nA rumor.<|im_end|>\n<|im_start|>assistant\n")
    assert tight.prompt_tokens <= full.prompt_tokens - 12


def test_continued_message_is_never_dropped() -> None:
    history = [*HISTORY, ChatMessage("character", "Well")]
    built = build(character=Character(name="Alice"), history=history, continue_last=True, max_prompt_tokens=3)
    assert built.text == "***\nAlice: Well"
    assert built.dropped_turns == 3


def test_fitting_counts_tokens_a_logarithmic_number_of_times() -> None:
    calls: list[str] = []

    def counting(text: str) -> int:
        calls.append(text)
        return count_words(text)

    history = [ChatMessage("user" if i % 2 else "character", f"message number {i}") for i in range(400)]
    builder = PromptBuilder(counting, None)
    built = builder.build(
        PromptRequest(Character(name="Alice"), "Bob", history, "hello", max_prompt_tokens=100)
    )
    assert built.prompt_tokens <= 100
    assert built.text.endswith("Bob: message number 399\nBob: hello\nAlice:")
    fewest = 400 - (100 - 4) // 4  # what fits; the block rule drops up to a block (~7 messages) more
    assert fewest <= built.dropped_turns <= fewest + 7
    prompts = [text for text in calls if text.endswith("Alice:")]
    assert len(prompts) < 20 and len(calls) - len(prompts) == 400  # each message counted once
    calls.clear()
    builder.build(PromptRequest(Character(name="Alice"), "Bob", [*history, ChatMessage("user", "more")], "hello",
                                max_prompt_tokens=100))
    assert len([text for text in calls if not text.endswith("Alice:")]) == 1  # only the new message


def test_a_growing_chat_drops_turns_in_blocks_and_keeps_its_start() -> None:
    """Once the window is full, turns go a block (a quarter of the budget) at a time at fixed
    points, so most turns' prompts continue the previous one (a prefix-cache hit) instead of
    starting one message later every turn."""
    history = [ChatMessage("user" if i % 2 else "character", f"message number {i}") for i in range(60)]

    def chat(fraction: float) -> list[tuple[int, str]]:
        builder, out = PromptBuilder(count_words, None), []
        for length in range(40, 60):
            built = builder.build(PromptRequest(Character(name="Alice"), "Bob", history[:length], None,
                                                max_prompt_tokens=100, turn_block_fraction=fraction))
            assert built.prompt_tokens <= 100
            out.append((built.dropped_turns, built.text))
        return out

    blocks, fewest = chat(0.25), chat(0)
    assert len({dropped for dropped, _ in fewest}) == 20  # a new start every turn
    assert len({dropped for dropped, _ in blocks}) <= 5
    continued = sum(1 for (d1, t1), (d2, t2) in zip(blocks, blocks[1:]) if d1 == d2 and t2.startswith(t1[:-6]))
    assert continued >= 15
    for (dropped, _), (least, _) in zip(blocks, fewest):
        assert least <= dropped <= least + 7  # never more than about a block beyond what fits


# --- lorebook in the prompt ---------------------------------------------------------


def lore_card(**book_fields: object) -> Character:
    book = Lorebook(
        entries=[
            LorebookEntry(
                keys=["HERE"], content="@@depth 4\nThe tavern of {{char}} is haunted.", name="haunting", priority=1
            ),
            LorebookEntry(
                keys=["rumor"], content="Rumors reach {{user}} fast.", position="after_char", comment="rumors"
            ),
            LorebookEntry(keys=["tavern"], content="Never seen: tavern is only in an old message."),
        ],
        **book_fields,  # type: ignore[arg-type]
    )
    return make_card(mes_example="", character_book=book)


def test_lore_before_and_after_the_character_definition() -> None:
    built = build(character=lore_card())
    assert built.text == (
        "The tavern of Alice is haunted.\n"
        "Alice is a witch who lives with Bob.\n"
        "Alice's personality: Curious and kind.\n"
        "Scenario: Bob visits Alice's tavern.\n"
        "Rumors reach Bob fast.\n"
        "***\n"
        "Alice: Welcome to my tavern!\n"
        "Bob: Thanks.\n"
        "Alice: What brings you here?\n"
        "Bob: A rumor.\n"
        "Alice:"
    )
    assert built.activated_lore == ["haunting", "rumors"]


def test_lore_in_instruct_mode_goes_into_the_system_message() -> None:
    built = build(character=lore_card(), mode="instruct", history=[])
    assert built.text == (
        "<|im_start|>system\n"
        "Alice is a witch who lives with Bob.\n"
        "Alice's personality: Curious and kind.\n"
        "Scenario: Bob visits Alice's tavern.\n"
        "Rumors reach Bob fast.<|im_end|>\n"
        "<|im_start|>user\nA rumor.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_lore_budget_from_the_request_wins() -> None:
    built = build(character=lore_card(token_budget=1000), lorebook_budget_tokens=4)
    assert built.activated_lore == ["rumors"]
    assert "haunted" not in built.text and "Rumors reach Bob fast.\n" in built.text


def test_lore_budget_from_the_book_counts_tokens_after_macros() -> None:
    # As inserted, "Rumors reach Bob Stone fast." is 5 words and the haunting entry 6:
    # 11 > 10, so the lower-priority haunting entry goes (raw "{{user}}" would count 4).
    assert build(character=lore_card(token_budget=11), user_name="Bob Stone").activated_lore == ["haunting", "rumors"]
    assert build(character=lore_card(token_budget=10), user_name="Bob Stone").activated_lore == ["rumors"]


def test_lore_scan_depth_from_the_book() -> None:
    built = build(character=lore_card(scan_depth=4))
    assert "Never seen: tavern is only in an old message." in built.text


def test_lore_is_never_dropped_to_fit_but_counts() -> None:
    with pytest.raises(PromptTooLongError):
        build(character=lore_card(), max_prompt_tokens=25)


# --- errors -------------------------------------------------------------------------


def test_instruct_modes_need_a_template() -> None:
    builder = PromptBuilder(count_words, None)
    for mode in ("instruct", "chat-instruct"):
        request = PromptRequest(make_card(), "Bob", [], "hi", mode=mode, max_prompt_tokens=100)  # type: ignore[arg-type]
        with pytest.raises(PromptBuildError, match="template"):
            builder.build(request)


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(PromptBuildError, match="mode"):
        build(mode="story")


def test_message_roles_are_validated() -> None:
    with pytest.raises(ValueError):
        ChatMessage("assistant", "hi")  # type: ignore[arg-type]


STRICT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate') }}{% endif %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}</s>{% endif %}"
    "{% endfor %}"
)


def test_strict_templates_get_system_folded_and_same_role_turns_merged() -> None:
    builder = PromptBuilder(count_words, JinjaChatTemplate(STRICT_TEMPLATE))
    request = PromptRequest(SIMPLE_CARD, "Bob", [HISTORY[1]], "A rumor.", mode="instruct", max_prompt_tokens=100)
    assert builder.build(request).text == "[INST] A witch.\n\nThanks.\n\nA rumor. [/INST]"
    continued = PromptRequest(
        SIMPLE_CARD, "Bob", [HISTORY[1], ChatMessage("character", "So")], None,
        mode="instruct", max_prompt_tokens=100, continue_last=True,
    )
    assert builder.build(continued).text == "[INST] A witch.\n\nThanks. [/INST]So"


# --- clean_reply ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Alice: Hello there  \n", "Hello there"),
        ("  alice:Hi", "Hi"),
        ("Hi {{USER}}, I'm <bot>, {{char}}.", "Hi Bob, I'm Alice, Alice."),
        ("Hi <user>", "Hi Bob"),
        ("Hello\nBob: let me talk", "Hello"),
        ("Hello\nAlice: again", "Hello"),
        ("Hello\nBob", "Hello"),
        ("Hello\nBo", "Hello"),
        ("Hello\nAli", "Hello"),
        ("Hello\nBob\nBob", "Hello"),
        ("Hello\nBob\n\nAlice\nBo", "Hello"),
        ("Hello\nThe end", "Hello\nThe end"),
        ("Then Alice: no.", "Then Alice: no."),
        ("Bob: what?", "Bob: what?"),
        ("", ""),
    ],
)
def test_clean_reply(raw: str, expected: str) -> None:
    assert clean_reply(raw, "Alice", "Bob") == expected


def test_clean_reply_for_impersonation_strips_the_users_name() -> None:
    assert clean_reply("Bob: I nod.", "Alice", "Bob", speaker="Bob") == "I nod."
