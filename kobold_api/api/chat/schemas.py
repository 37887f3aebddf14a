"""The /api/v1/chat request body: text-generation-webui's fields, aliases and validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ...chat.prompt import MODES
from ...engine.sampling import SamplingParams
from ...settings import GenerationDefaults
from ..fields import FieldReader
from ..generation_fields import read_ban_eos, read_banned_phrases, read_sampling, read_stop_strings

DEFAULT_CHARACTER = "Assistant"
DEFAULT_USER = "You"


@dataclass
class ChatInput:
    """A validated /api/v1/chat body."""

    user_input: str
    history: list[list[str]]
    mode: str
    character: str
    user_name: str
    regenerate: bool
    continue_last: bool
    impersonate: bool
    conversation_id: str | None
    max_new_tokens: int
    max_context_length: int
    stop_strings: list[str]
    template_name: str | None
    chat_instruct_command: str | None
    sampling: SamplingParams
    ban_eos: bool
    banned_phrases: list[str]


def parse_chat_input(body: Mapping[str, Any], defaults: GenerationDefaults) -> ChatInput:
    """Validate a /api/v1/chat body (text-generation-webui's fields plus any sampler)."""
    reader = FieldReader(body)
    mode = reader.string("mode", default="chat") or "chat"
    if mode not in MODES:
        reader.errors["mode"] = [f"Must be one of {', '.join(MODES)}."]
    history = _history_rows(body.get("history"), reader)
    character = reader.string("character", default=DEFAULT_CHARACTER) or DEFAULT_CHARACTER
    parsed = ChatInput(
        user_input=reader.string("user_input", "message", default="") or "",
        history=history,
        mode=mode,
        character=DEFAULT_CHARACTER if character == "None" else character,
        user_name=reader.string("your_name", "name1", "user_name", default=DEFAULT_USER) or DEFAULT_USER,
        regenerate=reader.boolean("regenerate", default=False),
        continue_last=reader.boolean("_continue", "continue", default=False),
        impersonate=reader.boolean("impersonate", default=False),
        conversation_id=reader.string("conversation_id"),
        max_new_tokens=reader.integer("max_new_tokens", "max_length", default=defaults.max_length, minimum=1),
        max_context_length=reader.integer("truncation_length", "max_context_length",
                                          default=defaults.max_context_length, minimum=16),
        stop_strings=read_stop_strings(reader),
        template_name=reader.string("instruction_template"),
        chat_instruct_command=reader.string("chat_instruct_command", "chat-instruct_command"),
        sampling=read_sampling(reader, defaults),
        ban_eos=read_ban_eos(reader),
        banned_phrases=read_banned_phrases(reader),
    )
    if sum([parsed.regenerate, parsed.continue_last, parsed.impersonate]) > 1:
        reader.errors["regenerate"] = ["Use at most one of regenerate, _continue and impersonate."]
    reader.raise_if_errors()
    return parsed


def _history_rows(value: Any, reader: FieldReader) -> list[list[str]]:
    """``history.internal`` (or ``visible``) as [user, reply] rows."""
    if value is None:
        return []
    rows = value.get("internal") or value.get("visible") or [] if isinstance(value, dict) else value
    if not isinstance(rows, list) or not all(
            isinstance(row, list) and len(row) == 2 and all(isinstance(x, str) for x in row) for row in rows):
        reader.errors["history"] = ['Must be {"internal": [[user, reply], ...], "visible": [...]}.']
        return []
    return [list(row) for row in rows]
