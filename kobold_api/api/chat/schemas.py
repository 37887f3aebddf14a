"""The request bodies of /api/v1/chat (text-generation-webui's fields and spellings, plus every
generation option), of conversations and of card uploads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BeforeValidator, Field, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError

from ...chat.prompt import MODES
from ...chat.templates import NAMED_TEMPLATE_NAMES, get_named_template
from ...engine.constraints import Constraint
from ...engine.sampling import SamplingParams
from ...settings import GenerationDefaults
from ..errors import ValidationError
from ..generation_options import GenerationOptions
from ..request_model import Bool, Count, RequestModel, number, spellings

DEFAULT_CHARACTER = "Assistant"
DEFAULT_USER = "You"
#: A turn regenerates, continues or impersonates: at most one of them.
_TURN_KINDS = ("regenerate", "_continue", "impersonate")


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
    constraint: Constraint | None = None
    #: The ``Idempotency-Key`` header (with a conversation) and a hash of the body it came with.
    idempotency_key: str | None = None
    fingerprint: str = ""


def _history_rows(value: Any) -> list[list[str]]:
    """``history.internal`` (else ``visible``) as [user, reply] rows; a bare list of rows too."""
    rows = (value.get("internal") or value.get("visible") or []) if isinstance(value, dict) else value
    if not isinstance(rows, list) or not all(
            isinstance(row, list) and len(row) == 2 and all(isinstance(x, str) for x in row) for row in rows):
        raise PydanticCustomError("history", 'Must be {"internal": [[user, reply], ...], "visible": [...]}.')
    return [list(row) for row in rows]


_ROWS = {"type": "array", "items": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2}}
History = Annotated[list[list[str]], BeforeValidator(_history_rows), WithJsonSchema(
    {"type": "object", "properties": {"internal": _ROWS, "visible": _ROWS},
     "description": "text-generation-webui's history: [user, reply] rows"})]


def _known_template(name: str) -> str:
    if name != "None":
        try:
            get_named_template(name)
        except KeyError as exc:
            raise PydanticCustomError("template", str(exc).strip("'\"")) from None
    return name


TemplateName = Annotated[str, AfterValidator(_known_template), WithJsonSchema(
    {"enum": [*NAMED_TEMPLATE_NAMES, "None"],
     "description": "a built-in instruction template; case, punctuation and aliases (Llama-v2...) are forgiven"})]


class ChatBody(GenerationOptions):
    """One chat turn: stateless with ``history``, or stored with ``conversation_id``."""

    #: At most one turn kind: some two of the three are not true.
    SCHEMA_RULES: ClassVar[list[dict[str, Any]]] = [{
        "anyOf": [{"properties": {a: {"const": False}, b: {"const": False}}}
                  for i, a in enumerate(_TURN_KINDS) for b in _TURN_KINDS[i + 1:]]}]

    user_input: str | None = spellings("user_input", "message")
    history: History | None = None
    mode: Literal[MODES] | None = None  # type: ignore[valid-type]
    character: str | None = Field(None, description=f"a character's name (default {DEFAULT_CHARACTER})")
    your_name: str | None = spellings("your_name", "name1", "user_name")
    regenerate: Bool | None = None
    continue_last: Bool | None = spellings("_continue", "continue")
    impersonate: Bool | None = None
    conversation_id: str | None = None
    max_new_tokens: Count | None = spellings("max_new_tokens", "max_length")
    truncation_length: Count | None = spellings("truncation_length", "max_context_length",
                                                description="the client's context size")
    instruction_template: TemplateName | None = None
    chat_instruct_command: str | None = spellings("chat_instruct_command", "chat-instruct_command")

    @model_validator(mode="after")
    def _one_turn_kind(self) -> "ChatBody":
        if sum([bool(self.regenerate), bool(self.continue_last), bool(self.impersonate)]) > 1:
            raise ValidationError({"regenerate": ["Use at most one of regenerate, _continue and impersonate."]})
        return self

    def to_input(self, defaults: GenerationDefaults) -> ChatInput:
        character = self.character or DEFAULT_CHARACTER
        return ChatInput(
            user_input=self.user_input or "",
            history=self.history or [],
            mode=self.mode or "chat",
            character=DEFAULT_CHARACTER if character == "None" else character,
            user_name=self.your_name or DEFAULT_USER,
            regenerate=bool(self.regenerate),
            continue_last=bool(self.continue_last),
            impersonate=bool(self.impersonate),
            conversation_id=self.conversation_id,
            max_new_tokens=self.max_new_tokens or defaults.max_length,
            max_context_length=self.truncation_length or defaults.max_context_length,
            stop_strings=self.stop_strings,
            template_name=self.instruction_template,
            chat_instruct_command=self.chat_instruct_command,
            sampling=self.sampling(defaults),
            ban_eos=self.ban_eos,
            banned_phrases=self.banned_phrases,
            constraint=self.constraint(),
        )


def parse_chat_input(body: Any, defaults: GenerationDefaults) -> ChatInput:
    """Validate a /api/v1/chat body (text-generation-webui's fields plus any sampler)."""
    return ChatBody.parse(body).to_input(defaults)


class NewConversationBody(RequestModel):
    character: str | None = Field(None, description=f"default {DEFAULT_CHARACTER}")
    user_name: str | None = spellings("user_name", "your_name", "name1")
    title: str | None = None
    greeting_index: number(0, integer=True) | None = Field(  # type: ignore[valid-type]
        None, description="which of the character's greetings opens the conversation")


class RenameBody(RequestModel):
    title: str


class MessageEditBody(RequestModel):
    """Edit a message's text, or pick one of its swipes (or both)."""

    SCHEMA_RULES: ClassVar[list[dict[str, Any]]] = [{"anyOf": [{"required": ["text"]}, {"required": ["swipe_id"]}]}]

    text: str | None = None
    swipe_id: number(0, integer=True) | None = None  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _something_to_do(self) -> "MessageEditBody":
        if self.text is None and self.swipe_id is None:
            raise ValidationError({"text": ["Send text to edit the message or swipe_id to select a swipe."]})
        return self


class UploadQuery(RequestModel):
    """The query of a card upload (the body is the card)."""

    name: str | None = Field(None, description="save under this name instead of the card's (a file name: "
                                               "no path separators, control characters or leading dot)",
                             json_schema_extra={"pattern": r"^\w(?:[\w ,'()!&+-]{0,62}\w)?$"})
    overwrite: Bool | None = Field(None, description="replace a character of that name")


#: The body of a card upload, documented in its simplest form. The upload takes the card's bytes
#: whatever the content type: V1/V2/V3 JSON, a PNG with the card embedded, text-generation-webui
#: YAML or CHARX; :mod:`kobold_api.chat.cards` reads them.
CARD_UPLOAD: dict[str, Any] = {
    "type": "object", "required": ["name"], "additionalProperties": False,
    "description": "A TavernAI V1 card. V2/V3 JSON, PNG cards, YAML and CHARX files are accepted as the raw body too.",
    "properties": {"name": {"type": "string", "pattern": "\\S"},
                   **{key: {"type": "string"} for key in ("description", "personality", "scenario", "first_mes",
                                                          "mes_example")}}}
