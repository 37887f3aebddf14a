"""OpenAI request bodies for /v1/completions and /v1/chat/completions.

Kobold sampler keys are accepted too (SillyTavern's "KoboldCpp" text-completion mode
sends them), with OpenAI's own defaults where OpenAI defines one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

from ...engine.sampling import SamplingParams
from ...settings import GenerationDefaults
from ..generation_options import N, GenerationOptions
from ..request_model import TOKEN_ID_SCHEMA, Bool, Count, RequestModel, number, spellings

ROLES = ("system", "user", "assistant")
#: Every role a message may carry: ``developer`` is read as ``system``; ``tool`` is kept.
MESSAGE_ROLES = (*ROLES, "developer", "tool")


@dataclass
class OpenAIInput:
    """The parts both OpenAI routes share, validated."""

    model: str | None
    max_tokens: int | None
    sampling: SamplingParams
    stop: list[str]
    n: int
    stream: bool
    include_usage: bool
    ban_eos: bool = False
    logprobs: int | None = None
    #: text-generation-webui / SillyTavern: the client's context size (None = the server's).
    truncation_length: int | None = None
    banned_phrases: list[str] = field(default_factory=list)


@dataclass
class CompletionInput(OpenAIInput):
    #: Each prompt is text or a list of token ids (both are OpenAI forms).
    prompts: list[str | list[int]] = field(default_factory=list)
    echo: bool = False


@dataclass
class ChatCompletionInput(OpenAIInput):
    messages: list[dict[str, str]] = field(default_factory=list)


def _openai_defaults(defaults: GenerationDefaults) -> GenerationDefaults:
    """OpenAI's documented defaults: temperature 1, top_p 1, no other truncation or penalty."""
    return replace(defaults, temperature=1.0, top_p=1.0, top_k=0, top_a=0.0, min_p=0.0, tfs=1.0,
                   typical=1.0, rep_pen=1.0)


class StreamOptions(RequestModel):
    include_usage: Bool | None = None


class OpenAIOptions(GenerationOptions):
    """What both OpenAI routes take: OpenAI's fields, plus every Kobold sampler and spelling."""

    model: str | None = Field(None, description="any name: the loaded model answers")
    max_tokens: Count | None = spellings("max_tokens", "max_completion_tokens", "max_length", "max_new_tokens",
                                         "n_predict")
    n: N | None = None  # type: ignore[valid-type]
    stream: Bool | None = None
    stream_options: StreamOptions | None = None
    truncation_length: Count | None = spellings(
        "truncation_length", "max_context_length", "num_ctx", description="the client's context size")

    def common(self, defaults: GenerationDefaults) -> dict[str, Any]:
        """The :class:`OpenAIInput` fields, OpenAI's defaults where a sampler was not sent."""
        return {
            "model": self.model, "max_tokens": self.max_tokens, "sampling": self.sampling(_openai_defaults(defaults)),
            "stop": self.stop_strings, "n": self.n or 1, "stream": bool(self.stream),
            "include_usage": bool(self.stream_options and self.stream_options.include_usage),
            "ban_eos": self.ban_eos, "banned_phrases": self.banned_phrases,
            "truncation_length": self.truncation_length,
        }


def _is_token_list(value: Any) -> bool:
    """Non-negative whole numbers (40.0 counts, as JSON clients send it)."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0 and float(t).is_integer() for t in value)


def _prompts(value: Any) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(value, str):
        return [value]
    if _is_token_list(value):
        return [[int(t) for t in value]]
    if isinstance(value, list) and value and all(isinstance(p, str) or _is_token_list(p) for p in value):
        return [p if isinstance(p, str) else [int(t) for t in p] for p in value]
    raise PydanticCustomError("prompt", "Must be a string, a list of strings, or token ids.")


_TOKEN_IDS = {"type": "array", "minItems": 1, "items": TOKEN_ID_SCHEMA}
Prompts = Annotated[list[Any], BeforeValidator(_prompts), WithJsonSchema(
    {"anyOf": [{"type": "string"}, _TOKEN_IDS, {"type": "array", "minItems": 1,
                                                "items": {"anyOf": [{"type": "string"}, _TOKEN_IDS]}}],
     "description": "text, token ids, or a list of either"})]


class CompletionBody(OpenAIOptions):
    prompt: Prompts
    logprobs: number(0, 20, integer=True) | None = None  # type: ignore[valid-type]
    echo: Bool | None = None

    def to_input(self, defaults: GenerationDefaults) -> CompletionInput:
        return CompletionInput(**self.common(defaults), logprobs=self.logprobs, prompts=self.prompt,
                               echo=bool(self.echo))


def parse_completion(body: Any, defaults: GenerationDefaults) -> CompletionInput:
    return CompletionBody.parse(body).to_input(defaults)


def _content(value: Any) -> str:
    """A message's text: a string, or the text parts of a content list (``null`` is empty)."""
    if isinstance(value, list):
        return "".join(part.get("text", "") for part in value
                       if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str))
    if not isinstance(value, str):
        raise PydanticCustomError("content", "Must be a string or a list of content parts.")
    return value


Content = Annotated[str, BeforeValidator(_content), WithJsonSchema(
    {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}, {"type": "null"}]})]


class Message(RequestModel):
    role: Literal[MESSAGE_ROLES]  # type: ignore[valid-type]
    content: Content = ""

    def as_dict(self) -> dict[str, str]:
        """``developer`` is OpenAI's newer name for ``system``."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


def _text_format(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or value.get("type") != "text":
        raise PydanticCustomError("response_format", "Only {\"type\": \"text\"} is supported by this server.")
    return value


class ChatCompletionBody(OpenAIOptions):
    messages: list[Message] = Field(min_length=1)
    response_format: Annotated[dict[str, Any], BeforeValidator(_text_format), WithJsonSchema(
        {"type": "object", "required": ["type"], "properties": {"type": {"const": "text"}}})] | None = None
    logprobs: Bool | None = None
    top_logprobs: number(0, 20, integer=True) | None = None  # type: ignore[valid-type]
    character: str | None = Field(None, description="extension: answer as this character (server-side chat)")
    conversation_id: str | None = Field(None, description="extension: use and store a server-side conversation")

    def to_input(self, defaults: GenerationDefaults) -> ChatCompletionInput:
        return ChatCompletionInput(**self.common(defaults), logprobs=(self.top_logprobs or 0) if self.logprobs else None,
                                   messages=[message.as_dict() for message in self.messages])


def parse_chat_completion(body: Any, defaults: GenerationDefaults) -> ChatCompletionInput:
    return ChatCompletionBody.parse(body).to_input(defaults)
