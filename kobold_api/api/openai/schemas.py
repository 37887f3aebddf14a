"""OpenAI request bodies for /v1/completions and /v1/chat/completions.

Kobold sampler keys are accepted too (SillyTavern's "KoboldCpp" text-completion mode
sends them), with OpenAI's own defaults where OpenAI defines one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from ...engine.sampling import SamplingParams
from ...settings import GenerationDefaults
from ..errors import ValidationError
from ..fields import FieldReader
from ..generation_fields import read_ban_eos, read_banned_phrases, read_n, read_sampling, read_stop_strings

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


def _common(reader: FieldReader, defaults: GenerationDefaults) -> dict[str, Any]:
    stream_options = reader.raw("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        reader.errors.setdefault("stream_options", []).append("Must be an object.")
        stream_options = {}
    max_tokens = reader.integer("max_tokens", "max_completion_tokens", "max_length", "max_new_tokens",
                                "n_predict", default=0, minimum=1)
    return {
        "model": reader.string("model"),
        "max_tokens": max_tokens or None,
        "sampling": read_sampling(reader, _openai_defaults(defaults)),
        "stop": read_stop_strings(reader),
        "n": read_n(reader),
        "stream": reader.boolean("stream", default=False),
        "include_usage": bool((stream_options or {}).get("include_usage", False)),
        "ban_eos": read_ban_eos(reader),
        "banned_phrases": read_banned_phrases(reader),
        "truncation_length": reader.integer("truncation_length", "max_context_length", "num_ctx", default=0,
                                            minimum=1) or None,
    }


def parse_completion(body: Mapping[str, Any], defaults: GenerationDefaults) -> CompletionInput:
    reader = FieldReader(body)
    prompts = _prompts(body.get("prompt"), reader)
    logprobs = reader.integer("logprobs", default=-1, minimum=0, maximum=20) if reader.has("logprobs") else -1
    common = _common(reader, defaults)
    echo = reader.boolean("echo", default=False)
    reader.raise_if_errors()
    return CompletionInput(**common, logprobs=logprobs if logprobs >= 0 else None, prompts=prompts, echo=echo)


def _is_token_list(value: Any) -> bool:
    """Non-negative whole numbers (40.0 counts, as JSON clients send it)."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0 and float(t).is_integer() for t in value)


def _token_list(value: list[Any]) -> list[int]:
    return [int(t) for t in value]


def _prompts(value: Any, reader: FieldReader) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(value, str):
        return [value]
    if _is_token_list(value):
        return [_token_list(value)]
    if isinstance(value, list) and value and all(isinstance(p, str) or _is_token_list(p) for p in value):
        return [p if isinstance(p, str) else _token_list(p) for p in value]
    reader.errors["prompt"] = ["Must be a string, a list of strings, or token ids."]
    return []


def parse_chat_completion(body: Mapping[str, Any], defaults: GenerationDefaults) -> ChatCompletionInput:
    reader = FieldReader(body)
    messages = _messages(body.get("messages"), reader)
    response_format = body.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind != "text":
            reader.errors["response_format"] = ["Only {\"type\": \"text\"} is supported by this server."]
    wants_logprobs = reader.boolean("logprobs", default=False)
    top_logprobs = reader.integer("top_logprobs", default=0, minimum=0, maximum=20)
    common = _common(reader, defaults)
    reader.raise_if_errors()
    return ChatCompletionInput(**common, logprobs=top_logprobs if wants_logprobs else None, messages=messages)


def _messages(value: Any, reader: FieldReader) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        reader.errors["messages"] = ["Must be a non-empty list of messages."]
        return []
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in MESSAGE_ROLES:
            reader.errors.setdefault("messages", []).append(
                f"messages[{index}] needs a role of system, user or assistant.")
            continue
        content = message.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(part.get("text", "") for part in content
                              if isinstance(part, dict) and part.get("type") == "text")
        if content is None:
            content = ""
        if not isinstance(content, str):
            reader.errors.setdefault("messages", []).append(f"messages[{index}].content must be a string.")
            continue
        role = "system" if message["role"] == "developer" else message["role"]
        messages.append({"role": role, "content": content})
    return messages


__all__ = ["ChatCompletionInput", "CompletionInput", "ValidationError", "parse_chat_completion", "parse_completion"]
