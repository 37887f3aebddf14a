"""OpenAI request bodies for /v1/completions and /v1/chat/completions.

Kobold sampler keys are accepted too (SillyTavern's "KoboldCpp" text-completion mode
sends them), with OpenAI's own defaults where OpenAI defines one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

from ...engine.constraints import Constraint, ConstraintError
from ...engine.sampling import SamplingParams
from ...settings import GenerationDefaults
from ..errors import ValidationError
from ..generation_options import GRAMMAR_FIELDS, N, GenerationOptions, not_together
from ..reasoning import template_variables
from ..tools import ToolFields, Toolset, call_text
from ..request_model import JSON_SCHEMA_DOC, TOKEN_ID_SCHEMA, Bool, Count, RequestModel, number, spellings

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
    constraint: Constraint | None = None
    #: Score the prompt too (completions with echo and logprobs).
    prompt_logprobs: bool = False


@dataclass
class CompletionInput(OpenAIInput):
    #: Each prompt is text or a list of token ids (both are OpenAI forms).
    prompts: list[str | list[int]] = field(default_factory=list)
    echo: bool = False


@dataclass
class ChatCompletionInput(OpenAIInput):
    messages: list[dict[str, Any]] = field(default_factory=list)
    toolset: Toolset | None = None
    #: What the chat template may read beyond the messages (see :func:`reasoning.template_variables`).
    template_variables: dict[str, Any] = field(default_factory=dict)


def _openai_defaults(defaults: GenerationDefaults) -> GenerationDefaults:
    """OpenAI's documented defaults: temperature 1, top_p 1, no other truncation or penalty."""
    return replace(defaults, temperature=1.0, top_p=1.0, top_k=0, top_a=0.0, min_p=0.0, tfs=1.0,
                   typical=1.0, rep_pen=1.0)


class StreamOptions(RequestModel):
    include_usage: Bool | None = None


def _response_format(value: Any) -> dict[str, Any]:
    """``{"type": "text" | "json_object" | "json_schema", ...}``; the schema itself is checked
    when it is compiled (:meth:`OpenAIOptions.common`)."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise PydanticCustomError("response_format", 'Must be {"type": "text"}, {"type": "json_object"} or '
                                                     '{"type": "json_schema", "json_schema": {"schema": {...}}}.')
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
            raise PydanticCustomError("response_format", "json_schema must be an object with a \"schema\" object.")
    return value


ResponseFormat = Annotated[dict[str, Any], BeforeValidator(_response_format), WithJsonSchema({
    "type": "object", "required": ["type"], "description": "structured output (json_schema: strict or not, the "
                                                           "output always follows the schema)",
    "properties": {"type": {"enum": ["text", "json_object", "json_schema"]},
                   "json_schema": {"type": "object", "properties": {
                       "name": {"type": "string"}, "schema": JSON_SCHEMA_DOC, "strict": {"type": "boolean"}}}}})]
#: ``response_format`` asking for JSON (it and a grammar or tools do not go together).
_JSON_FORMAT = {"properties": {"type": {"enum": ["json_object", "json_schema"]}}}


class OpenAIOptions(GenerationOptions):
    """What both OpenAI routes take: OpenAI's fields, plus every Kobold sampler and spelling."""

    SCHEMA_RULES: ClassVar[list[dict[str, Any]]] = [not_together(GRAMMAR_FIELDS, "response_format", _JSON_FORMAT)]

    model: str | None = Field(None, description="any name: the loaded model answers")
    max_tokens: Count | None = spellings("max_tokens", "max_completion_tokens", "max_length", "max_new_tokens",
                                         "n_predict")
    n: N | None = None  # type: ignore[valid-type]
    stream: Bool | None = None
    stream_options: StreamOptions | None = None
    truncation_length: Count | None = spellings(
        "truncation_length", "max_context_length", "num_ctx", description="the client's context size")
    response_format: ResponseFormat | None = None

    def output_constraint(self) -> Constraint | None:
        """``response_format`` or ``grammar`` (not both), compiled; a bad schema is a 400 naming it."""
        fmt = self.response_format or {"type": "text"}
        if fmt["type"] != "text" and self.grammar:
            raise ValidationError({"response_format": ["Send either response_format or grammar, not both."]})
        try:
            if fmt["type"] == "json_object":  # llama.cpp's form with a schema too
                schema = fmt.get("schema")
                return Constraint.from_json_schema(schema) if schema is not None else Constraint.json_object()
            if fmt["type"] == "json_schema":
                return Constraint.from_json_schema(fmt["json_schema"].get("schema", {}))
        except ConstraintError as exc:
            raise ValidationError({"response_format": [str(exc)]}) from None
        return self.constraint()

    def common(self, defaults: GenerationDefaults) -> dict[str, Any]:
        """The :class:`OpenAIInput` fields, OpenAI's defaults where a sampler was not sent."""
        return {
            "model": self.model, "max_tokens": self.max_tokens, "sampling": self.sampling(_openai_defaults(defaults)),
            "stop": self.stop_strings, "n": self.n or 1, "stream": bool(self.stream),
            "include_usage": bool(self.stream_options and self.stream_options.include_usage),
            "ban_eos": self.ban_eos, "banned_phrases": self.banned_phrases,
            "truncation_length": self.truncation_length, "constraint": self.output_constraint(),
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
    logprobs: number(0, 20, integer=True) | None = spellings(  # type: ignore[valid-type]
        "logprobs", "n_probs", description="alternatives per token; with echo the prompt is scored too")
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
    tool_calls: list[dict[str, Any]] | None = Field(None, description="an assistant turn's function calls")
    tool_call_id: str | None = Field(None, description="a tool message: the call it answers")

    def as_dict(self, template_renders_tools: bool = False) -> dict[str, Any]:
        """``developer`` is OpenAI's newer name for ``system``. An assistant turn's calls are kept
        for a template that renders them, else written into its text as the model writes calls."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": self.content}
        if self.tool_calls and template_renders_tools:
            message["tool_calls"] = [{**call, "function": {**call.get("function", {}), "arguments": _arguments(call)}}
                                     for call in self.tool_calls]
        elif self.tool_calls:
            message["content"] = (self.content + "\n" if self.content else "") + call_text(self.tool_calls)
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _arguments(call: dict[str, Any]) -> Any:
    """A call's arguments as an object (OpenAI sends them as JSON text; templates iterate them)."""
    arguments = (call.get("function") or {}).get("arguments")
    try:
        return json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        return arguments


class ChatCompletionBody(OpenAIOptions, ToolFields):
    SCHEMA_RULES: ClassVar[list[dict[str, Any]]] = [*OpenAIOptions.SCHEMA_RULES, not_together("tools", GRAMMAR_FIELDS),
                                                    not_together("tools", "response_format", _JSON_FORMAT)]

    messages: list[Message] = Field(min_length=1)
    logprobs: Bool | None = None
    top_logprobs: number(0, 20, integer=True) | None = None  # type: ignore[valid-type]
    character: str | None = Field(None, description="extension: answer as this character (server-side chat)")
    conversation_id: str | None = Field(None, description="extension: use and store a server-side conversation")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="more variables for the model's chat template (e.g. enable_thinking)")

    def to_input(self, defaults: GenerationDefaults, template_renders_tools: bool = False) -> ChatCompletionInput:
        toolset = self.toolset()
        common = self.common(defaults)
        if toolset is not None:
            if common["constraint"] is not None:
                raise ValidationError({"tools": ["Send tools or a response_format/grammar, not both."]})
            common["constraint"] = toolset.constraint()
        return ChatCompletionInput(**common, logprobs=(self.top_logprobs or 0) if self.logprobs else None,
                                   messages=[message.as_dict(template_renders_tools) for message in self.messages],
                                   toolset=toolset, template_variables=template_variables(
                                       self.chat_template_kwargs, self.reasoning_effort or ""))


def parse_chat_completion(body: Any, defaults: GenerationDefaults,
                          template_renders_tools: bool = False) -> ChatCompletionInput:
    return ChatCompletionBody.parse(body).to_input(defaults, template_renders_tools)
