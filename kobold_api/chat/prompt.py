"""The one prompt builder for server-side chat: card + history -> prompt text + stop strings.

Chat mode follows SillyTavern's default story string (system, lore before,
description, personality, scenario, lore after), example blocks headed ``***``,
a ``***`` chat start and ``Name: text`` lines, ending in ``{char}:``. Instruct mode
renders the same content through a chat template; chat-instruct wraps the chat-mode
prompt in one instruct turn. Prompts are fitted to a token budget by dropping example
dialogue first, then the oldest turns, never the character definition or the new
input, and the builder reports what it dropped (text-generation-webui silently
left-truncated the character context instead).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import KW_ONLY, dataclass, field
from typing import Callable, Literal

from kobold_api.chat.character import Character
from kobold_api.chat.lorebook import activate_entries
from kobold_api.chat.templates import ChatTemplate, ChatTemplateError, render_open_turn
from kobold_api.engine.stopping import partial_suffix_length

__all__ = [
    "BuiltPrompt",
    "ChatMessage",
    "DEFAULT_CHAT_INSTRUCT_COMMAND",
    "PromptBuildError",
    "PromptBuilder",
    "PromptRequest",
    "PromptTooLongError",
    "clean_reply",
    "replace_macros",
]

Role = Literal["user", "character"]
Mode = Literal["chat", "instruct", "chat-instruct"]

DEFAULT_CHAT_INSTRUCT_COMMAND = (
    'Continue the chat dialogue below. Write a single reply for the character "<|character|>".\n\n<|prompt|>'
)
EXAMPLE_SEPARATOR = "***"
CHAT_START = "***"
DEFAULT_LORE_BUDGET_FRACTION = 0.25  # SillyTavern's default world-info budget share
MESSAGE_COUNT_CACHE = 8192  # messages whose token counts a builder remembers

MODES: tuple[Mode, ...] = ("chat", "instruct", "chat-instruct")
_CHAR_MACRO = re.compile(r"\{\{char\}\}|<bot>|<char>", re.IGNORECASE)
_USER_MACRO = re.compile(r"\{\{user\}\}|<user>", re.IGNORECASE)
_ORIGINAL_MACRO = re.compile(r"\{\{original\}\}", re.IGNORECASE)
_EXAMPLE_START = re.compile(r"<start>", re.IGNORECASE)


class PromptBuildError(ValueError):
    """The request cannot be turned into a prompt (bad mode, no template, nothing to continue)."""


class PromptTooLongError(PromptBuildError):
    """Even the definition plus the new input exceed the budget; nothing more may be dropped."""

    def __init__(self, prompt_tokens: int, max_prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_prompt_tokens = max_prompt_tokens
        super().__init__(
            f"prompt needs {prompt_tokens} tokens after dropping all example dialogue and "
            f"history, but only {max_prompt_tokens} are available (raise the context size or ask "
            "for a shorter reply)"
        )


@dataclass(frozen=True)
class ChatMessage:
    """One line of chat history; the speaker's name is derived from the role."""

    role: Role
    text: str

    def __post_init__(self) -> None:
        if self.role not in ("user", "character"):
            raise ValueError(f"message role must be 'user' or 'character', not {self.role!r}")


@dataclass
class PromptRequest:
    """Everything one generation needs; the client sends the full history every time."""

    character: Character
    user_name: str
    history: list[ChatMessage] = field(default_factory=list)
    user_input: str | None = None
    _: KW_ONLY
    max_prompt_tokens: int
    mode: Mode = "chat"
    continue_last: bool = False
    impersonate: bool = False
    chat_instruct_command: str | None = None
    template: ChatTemplate | None = None
    extra_stop_strings: list[str] = field(default_factory=list)
    lorebook_budget_tokens: int | None = None
    #: When turns must go, they go in blocks of about this share of the budget, cut at points
    #: fixed in the history itself: the next turns then keep the same start, so the model's
    #: prefix cache continues it instead of re-reading the window every turn. 0: drop as few
    #: turns as fit (a new start every turn once the window is full).
    turn_block_fraction: float = 0.25


@dataclass
class BuiltPrompt:
    """The prompt plus what the caller needs to generate and to report truncation."""

    text: str
    stop_strings: list[str]
    prompt_tokens: int
    dropped_turns: int
    dropped_examples: int
    activated_lore: list[str]
    speaker: str


def replace_macros(text: str, char_name: str, user_name: str) -> str:
    """Replace ``{{char}}``/``<BOT>``/``<CHAR>`` and ``{{user}}``/``<USER>``, case-insensitively.

    The V1 spec requires case-insensitive replacement; text-generation-webui's
    case-sensitive version left ``{{User}}`` in prompts. A function replacement keeps
    names containing backslashes literal.
    """
    text = _CHAR_MACRO.sub(lambda _: char_name, text)
    return _USER_MACRO.sub(lambda _: user_name, text)


def split_examples(mes_example: str) -> list[str]:
    """Example dialogue blocks, split on ``<START>`` (any case), trimmed, empty ones dropped."""
    return [block.strip() for block in _EXAMPLE_START.split(mes_example) if block.strip()]


def clean_reply(text: str, char_name: str, user_name: str, *, speaker: str | None = None) -> str:
    """Tidy a generated reply for display and storage.

    Strips a leading ``"{speaker}:"`` (default: the character) that models like to
    repeat, fills ``{{user}}``/``{{char}}``-style placeholders, and removes a trailing
    half-written turn marker and any lone name lines before it (``"\\nBob"`` when generation
    stopped at the length limit: text the stop-string matcher rightly released, since it was not
    a full stop string).
    The cut at a whole ``"\\n{name}:"`` is a safety net: those are stop strings already.
    """
    speaker = char_name if speaker is None else speaker
    cleaned = text.lstrip()
    if speaker and cleaned.casefold().startswith(f"{speaker}:".casefold()):
        cleaned = cleaned[len(speaker) + 1:].lstrip()
    cleaned = replace_macros(cleaned, char_name, user_name)
    markers = [f"\n{name}:" for name in (user_name, char_name) if name]
    for marker in markers:
        position = cleaned.find(marker)
        if position >= 0:
            cleaned = cleaned[:position]
    cleaned = cleaned.rstrip()
    # "...\nBob\nBo": a lone name line before the half marker is the same dangling turn
    while partial := partial_suffix_length(cleaned, markers):
        cleaned = cleaned[: len(cleaned) - partial].rstrip()
    return cleaned


def _dedupe(strings: list[str]) -> list[str]:
    """Order-preserving de-duplication that also drops empty strings."""
    seen: list[str] = []
    for string in strings:
        if string and string not in seen:
            seen.append(string)
    return seen


@dataclass(frozen=True)
class _Parts:
    """The prompt's pieces after macro replacement, before fitting; names already resolved."""

    char_name: str
    user_name: str
    story_string: str  # newline-terminated lines, or ""
    examples: list[str]  # block bodies, without heading
    history: list[ChatMessage]  # droppable, oldest first
    user_input: str | None  # the new user line (None: none, e.g. regenerate/continue)
    post_history: str
    open_role: Role  # whose line the prompt ends in
    open_text: str  # text already written on that line ("" unless continue/impersonate)
    command: str  # chat-instruct command

    def name_of(self, role: Role) -> str:
        return self.user_name if role == "user" else self.char_name


class PromptBuilder:
    """Assembles prompts for one model; holds only its tokenizer counter and default template."""

    def __init__(self, count_tokens: Callable[[str], int], chat_template: ChatTemplate | None = None) -> None:
        self.count_tokens = count_tokens
        self.chat_template = chat_template
        # Token counts of single messages (block starts need each one; a chat resends the same
        # messages every turn, so each is counted once), least recently used dropped first.
        self._message_tokens: OrderedDict[str, int] = OrderedDict()
        self._message_lock = threading.Lock()

    def _count_message(self, text: str) -> int:
        with self._message_lock:
            if text in self._message_tokens:
                self._message_tokens.move_to_end(text)
                return self._message_tokens[text]
        count = self.count_tokens(text)
        with self._message_lock:
            self._message_tokens[text] = count
            while len(self._message_tokens) > MESSAGE_COUNT_CACHE:
                self._message_tokens.popitem(last=False)
        return count

    # --- public ---------------------------------------------------------------------

    def build(self, request: PromptRequest) -> BuiltPrompt:
        """Build and fit the prompt; raises PromptBuildError / PromptTooLongError."""
        if request.mode not in MODES:
            raise PromptBuildError(f"mode must be one of {', '.join(MODES)}, not {request.mode!r}")
        template = request.template or self.chat_template
        if request.mode != "chat" and template is None:
            raise PromptBuildError(f"mode {request.mode!r} needs a chat template, and none is configured")

        parts, activated_lore = self._collect_parts(request)
        assemble = self._assembler(request.mode, parts, template)
        block = int(request.max_prompt_tokens * request.turn_block_fraction)
        text, tokens, kept_examples, first_turn = self._fit(
            assemble, len(parts.examples), len(parts.history), request.max_prompt_tokens,
            lambda: self._block_starts(parts.history, block),
        )
        return BuiltPrompt(
            text=text,
            stop_strings=self._stop_strings(request, parts, template),
            prompt_tokens=tokens,
            dropped_turns=first_turn,
            dropped_examples=len(parts.examples) - kept_examples,
            activated_lore=activated_lore,
            speaker=parts.name_of(parts.open_role),
        )

    # --- pieces ---------------------------------------------------------------------

    def _collect_parts(self, request: PromptRequest) -> tuple[_Parts, list[str]]:
        """Resolve names, macros, lore, the open line and the history that may be dropped."""
        card = request.character
        char_name, user_name = card.display_name, request.user_name

        def fill(text: str) -> str:
            return replace_macros(text, char_name, user_name).strip()

        history = [ChatMessage(m.role, replace_macros(m.text, char_name, user_name)) for m in request.history]
        user_input = fill(request.user_input or "") or None
        if request.continue_last:
            if not history:
                raise PromptBuildError("continue_last needs at least one message in the history")
            # The continued message keeps its exact text: the reply is appended to it.
            *history, continued = history
            open_role, open_text, user_input = continued.role, continued.text, None
        elif request.impersonate:
            # Any user input is the start of the user's line that the model completes.
            open_role, open_text, user_input = "user", user_input or "", None
        else:
            open_role, open_text = "character", ""
        history = [ChatMessage(m.role, m.text.strip()) for m in history if m.text.strip()]

        scan_texts = [m.text for m in history]
        if open_text:
            scan_texts.append(open_text)
        if user_input:
            scan_texts.append(user_input)
        lore_before, lore_after, activated = self._activate_lore(request, scan_texts, fill)

        system = fill(_ORIGINAL_MACRO.sub("", card.system_prompt))
        personality, scenario = fill(card.personality), fill(card.scenario)
        story_lines = [
            system,
            lore_before,
            fill(card.description),
            f"{char_name}'s personality: {personality}" if personality else "",
            f"Scenario: {scenario}" if scenario else "",
            lore_after,
        ]
        # Post-history instructions speak to the character, so they are left out when
        # the model writes the user's line.
        post_history = "" if open_role == "user" else fill(_ORIGINAL_MACRO.sub("", card.post_history_instructions))
        parts = _Parts(
            char_name=char_name,
            user_name=user_name,
            story_string="".join(f"{line}\n" for line in story_lines if line),
            examples=split_examples(replace_macros(card.mes_example, char_name, user_name)),
            history=history,
            user_input=user_input,
            post_history=post_history,
            open_role=open_role,
            open_text=open_text,
            command=request.chat_instruct_command or DEFAULT_CHAT_INSTRUCT_COMMAND,
        )
        return parts, activated

    def _activate_lore(
        self, request: PromptRequest, scan_texts: list[str], fill: Callable[[str], str]
    ) -> tuple[str, str, list[str]]:
        """Lore text for before/after the description, and labels of what activated."""
        book = request.character.character_book
        if book is None or not book.entries:
            return "", "", []
        if request.lorebook_budget_tokens is not None:
            budget = request.lorebook_budget_tokens
        elif book.token_budget is not None:
            budget = book.token_budget
        else:
            budget = int(request.max_prompt_tokens * DEFAULT_LORE_BUDGET_FRACTION)
        # Budget in tokens of the text as inserted, i.e. after macro replacement.
        before, after = activate_entries(book, scan_texts, lambda text: self.count_tokens(fill(text)), budget)
        labels = [entry.name or entry.comment or next(iter(entry.keys), "") for entry in before + after]
        return (
            "\n".join(fill(entry.content) for entry in before),
            "\n".join(fill(entry.content) for entry in after),
            labels,
        )

    # --- assembly per mode --------------------------------------------------------------

    def _assembler(
        self, mode: str, parts: _Parts, template: ChatTemplate | None
    ) -> Callable[[int, int], str]:
        """A function (examples kept, first history index kept) -> full prompt text."""
        if mode == "chat":
            return lambda kept, first: _chat_body(parts, kept, first) + _open_line(parts)
        assert template is not None
        if mode == "instruct":
            return lambda kept, first: _instruct_text(parts, template, kept, first)
        return lambda kept, first: _chat_instruct_text(parts, template, kept, first)

    def _block_starts(self, history: list[ChatMessage], block_tokens: int) -> list[int]:
        """History indices where blocks of ``block_tokens`` begin, counted from the first message:
        the message where the running token count first reaches 1, 2, 3... blocks. They depend
        only on the messages before them, so they stay put as the chat grows."""
        if block_tokens <= 0:
            return []
        starts, total, next_start = [], 0, block_tokens
        for index, message in enumerate(history):
            if total >= next_start:
                starts.append(index)
                next_start = (total // block_tokens + 1) * block_tokens
            total += self._count_message(message.text) + 1
        return starts

    def _fit(
        self, assemble: Callable[[int, int], str], example_count: int, turn_count: int, max_tokens: int,
        block_starts: Callable[[], list[int]] = list,
    ) -> tuple[str, int, int, int]:
        """Find the richest prompt within budget: drop examples from the last, then oldest turns,
        a block at a time (``block_starts``; as few as fit past the last block start).

        Token counts are taken on the whole assembled text (pieces do not add up exactly
        once merged), with binary searches so a long chat costs O(log n) counts.
        Returns (text, tokens, examples kept, first history index kept).
        """
        counted: dict[tuple[int, int], tuple[str, int]] = {}

        def measure(kept: int, first: int) -> tuple[str, int]:
            if (kept, first) not in counted:
                text = assemble(kept, first)
                counted[(kept, first)] = (text, self.count_tokens(text))
            return counted[(kept, first)]

        def fits(kept: int, first: int) -> bool:
            return measure(kept, first)[1] <= max_tokens

        if fits(example_count, 0):
            kept, first = example_count, 0
        elif fits(0, 0):
            low, high = 0, example_count  # fits(low) is true, fits(high) is false
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (middle, high) if fits(middle, 0) else (low, middle)
            kept, first = low, 0
        else:
            if not fits(0, turn_count):
                raise PromptTooLongError(measure(0, turn_count)[1], max_tokens)
            starts = [start for start in block_starts() if start < turn_count]
            low_block, high_block = -1, len(starts)  # fits(starts[high_block]) (or the end) is true
            while high_block - low_block > 1:
                middle = (low_block + high_block) // 2
                low_block, high_block = (low_block, middle) if fits(0, starts[middle]) else (middle, high_block)
            if high_block < len(starts):
                text, tokens = measure(0, starts[high_block])
                return text, tokens, 0, starts[high_block]
            low, high = starts[-1] if starts else 0, turn_count  # fits(high) is true, fits(low) is false
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (low, middle) if fits(0, middle) else (middle, high)
            kept, first = 0, high
        text, tokens = measure(kept, first)
        return text, tokens, kept, first

    # --- stop strings ---------------------------------------------------------------

    def _stop_strings(self, request: PromptRequest, parts: _Parts, template: ChatTemplate | None) -> list[str]:
        """Turn markers that end the reply: the other party's name first, then our own."""
        speaker = parts.name_of(parts.open_role)
        other = parts.name_of("character" if parts.open_role == "user" else "user")
        stops = [f"\n{other}:", f"\n{speaker}:", f"\n{EXAMPLE_SEPARATOR}", f"\n{CHAT_START}"]
        if request.mode != "chat" and template is not None:
            stops.extend(template.stop_strings)
            if request.mode == "instruct" and parts.open_role == "user":
                # Writing the user's turn: the assistant's turn opening also ends it.
                stops.append(template.assistant_prefix.strip())
        stops.extend(request.extra_stop_strings)
        return _dedupe(stops)


def _open_line(parts: _Parts) -> str:
    """``Name:`` with no trailing space, or ``Name: partial`` when continuing/impersonating."""
    name = parts.name_of(parts.open_role)
    return f"{name}: {parts.open_text}" if parts.open_text else f"{name}:"


def _example_blocks(parts: _Parts, kept: int) -> str:
    return "".join(f"{EXAMPLE_SEPARATOR}\n{block}\n" for block in parts.examples[:kept])


def _chat_body(parts: _Parts, kept: int, first: int) -> str:
    """Chat-mode prompt up to (not including) the open line; every line newline-terminated."""
    lines = [f"{parts.name_of(m.role)}: {m.text}\n" for m in parts.history[first:]]
    if parts.user_input:
        lines.append(f"{parts.user_name}: {parts.user_input}\n")
    if parts.post_history:
        lines.append(f"{parts.post_history}\n")
    return parts.story_string + _example_blocks(parts, kept) + f"{CHAT_START}\n" + "".join(lines)


def _instruct_text(parts: _Parts, template: ChatTemplate, kept: int, first: int) -> str:
    """The card as the system message, history as user/assistant turns, then the open turn."""
    system = (parts.story_string + _example_blocks(parts, kept)).rstrip("\n")
    messages = [{"role": "system", "content": system}] if system else []
    messages += [
        {"role": "user" if m.role == "user" else "assistant", "content": m.text} for m in parts.history[first:]
    ]
    if parts.user_input:
        messages.append({"role": "user", "content": parts.user_input})
    if parts.post_history:
        # Right before the reply, in the user's voice: appended to a closing user turn,
        # else a user turn of its own (keeps user/assistant alternation intact).
        if messages and messages[-1]["role"] == "user":
            messages[-1] = {"role": "user", "content": f"{messages[-1]['content']}\n\n{parts.post_history}"}
        else:
            messages.append({"role": "user", "content": parts.post_history})
    open_role = "user" if parts.open_role == "user" else "assistant"
    if parts.open_role == "character" and not parts.open_text:
        return _render(template, messages, add_generation_prompt=True)
    return _render_open(template, messages, open_role, parts.open_text)


def _chat_instruct_text(parts: _Parts, template: ChatTemplate, kept: int, first: int) -> str:
    """The chat-mode prompt as one instruct user turn, the assistant answering ``Name:``."""
    chat_prompt = _chat_body(parts, kept, first).rstrip("\n")
    speaker = parts.name_of(parts.open_role)
    command = replace_macros(parts.command, parts.char_name, parts.user_name).replace("<|character|>", speaker)
    if "<|prompt|>" in command:
        instruction = command.replace("<|prompt|>", chat_prompt)
    else:
        instruction = f"{command}\n\n{chat_prompt}"
    return _render_open(template, [{"role": "user", "content": instruction}], "assistant", _open_line(parts))


def _fold_for_strict_templates(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Fold the system message into the first user turn and merge same-role neighbours.

    For templates (e.g. Mistral's, Gemma's) that reject a system role or demand strict
    user/assistant alternation.
    """
    system = ""
    folded: list[dict[str, str]] = []
    for message in messages:
        if message["role"] == "system":
            system = f"{system}\n\n{message['content']}" if system else message["content"]
            continue
        if folded and folded[-1]["role"] == message["role"]:
            folded[-1] = {"role": message["role"], "content": f"{folded[-1]['content']}\n\n{message['content']}"}
        else:
            folded.append(dict(message))
    if system:
        if folded and folded[0]["role"] == "user":
            folded[0] = {"role": "user", "content": f"{system}\n\n{folded[0]['content']}"}
        else:
            folded.insert(0, {"role": "user", "content": system})
    return folded


def _render(template: ChatTemplate, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    try:
        return template.render(messages, add_generation_prompt)
    except ChatTemplateError:
        return template.render(_fold_for_strict_templates(messages), add_generation_prompt)


def _render_open(template: ChatTemplate, messages: list[dict[str, str]], role: str, text: str) -> str:
    try:
        return render_open_turn(template, messages, role, text)
    except ChatTemplateError:
        return render_open_turn(template, _fold_for_strict_templates(messages), role, text)
