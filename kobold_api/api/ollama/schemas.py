"""Ollama request bodies for /api/generate, /api/chat and /api/show.

Ollama puts the samplers in ``options`` under its own names. :class:`OllamaOptions` is the
shared :class:`GenerationOptions` (so every bound and spelling is the one the other routes
validate with; ``typical_p``, ``repeat_penalty``, ``seed`` and ``stop`` are spellings there
already) plus the names only Ollama has or means its own way (``num_predict``, ``num_ctx``,
``repeat_last_n``, ``tfs_z``). Ollama's defaults apply where a sampler is not sent.

What this server cannot do is refused by the models, with a message that says so, and documented
as such (``images`` must be empty, ``suffix`` and ``template`` too), so the OpenAPI
document never promises what the server would reject.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any, Callable, ClassVar, Literal

from pydantic import AfterValidator, BeforeValidator, Field, WithJsonSchema, create_model
from pydantic_core import PydanticCustomError

from ...engine.constraints import Constraint, ConstraintError
from ...engine.sampling import SamplingParams
from ...settings import GenerationDefaults
from ..errors import ValidationError
from ..generation_options import GRAMMAR_FIELDS, SAMPLERS, GenerationOptions, not_together
from ..request_model import JSON_SCHEMA_DOC, Bool, Count, RequestModel, TokenIds, number, spellings
from ..tools import Tool, Toolset, call_text

#: Ollama's documented defaults, for the samplers a request leaves out (its ``repeat_last_n``
#: default, 64, is our ``rep_pen_range``).
OLLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "typical": 1.0, "tfs": 1.0,
                   "top_a": 0.0, "rep_pen": 1.1, "rep_pen_range": 64}

NO_VISION = "This server's model has no vision: images are not supported."
NO_SUFFIX = "suffix (fill-in-the-middle) is not supported by this server."
NO_TEMPLATE = ("template is not supported: prompts are rendered with the model's own chat template. "
               "Send raw=true with a prompt formatted yourself instead.")


def _respelled(name: str, add: tuple[str, ...] = (), drop: tuple[str, ...] = ()) -> Any:
    """The shared sampler ``name`` (its bounds) with spellings added or taken away."""
    sampler = SAMPLERS[name]
    names = tuple(spelling for spelling in dict.fromkeys((*sampler.names, *add)) if spelling not in drop)
    return replace(sampler, names=names).fields()[name]


def _empty(message: str) -> Callable[[Any], Any]:
    """A validator for a field this server only takes empty: anything else is ``message``."""

    def check(value: Any) -> Any:
        if value:
            raise PydanticCustomError("unsupported", message)
        return value

    return check


def _refused_list(message: str, description: str) -> Any:
    return Annotated[list[Any], AfterValidator(_empty(message)), WithJsonSchema(
        {"type": "array", "maxItems": 0, "description": description})]


def _refused_string(message: str, description: str) -> Any:
    return Annotated[str, AfterValidator(_empty(message)), WithJsonSchema(
        {"type": "string", "maxLength": 0, "description": description})]


NoImages = _refused_list(NO_VISION, "refused unless empty: the model has no vision")
NoSuffix = _refused_string(NO_SUFFIX, "refused unless empty: no fill-in-the-middle")
NoTemplate = _refused_string(NO_TEMPLATE, "refused unless empty: the model's own chat template is used")


def _format(value: Any) -> Constraint | None:
    """``"json"``: any JSON object; an object: output valid under that JSON schema; ``""``: none."""
    if value == "":
        return None
    if value == "json":
        return Constraint.json_object()
    if isinstance(value, dict):
        try:
            return Constraint.from_json_schema(value)
        except ConstraintError as exc:
            raise PydanticCustomError("format", str(exc)) from None
    raise PydanticCustomError("format", "Must be \"json\" or a JSON schema object.")


#: Documented: the common core of a schema (see ``JSON_SCHEMA_DOC``).
Format = Annotated[Any, BeforeValidator(_format), WithJsonSchema({
    "anyOf": [{"enum": ["json", ""]}, JSON_SCHEMA_DOC],
    "description": "\"json\": any JSON object; a JSON schema object: JSON valid under it"})]
#: Accepted and ignored: the model stays loaded (a zero still answers a load request as "unload").
KeepAlive = Annotated[Any, WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "number"}],
                                           "description": "accepted; the model always stays loaded"})]
#: A thinking model's thoughts come back as ``message.thinking``; ``think`` can switch them off or bound them.
Think = Annotated[Any, WithJsonSchema({
    "anyOf": [{"type": "boolean"}, {"enum": ["high", "medium", "low"]}],
    "description": "false: no thinking (an empty block where the template allows, else one closed at once); a "
                   "level: bounded as reasoning_effort is; true or absent: free"})]

NumPredict = number(integer=True, description=(
    "tokens to generate; below 1 or absent: until a stop, the end of the turn or the end of the context"))
RepeatLastN = number(-1, integer=True, description=(
    "tokens the repetition penalties look back over; -1: the whole context; 0: penalties off"))
#: ``tfs_z`` is Ollama's ``tfs``; ``repeat_last_n`` is read below, as Ollama means it (-1 and 0 differ
#: from ``rep_pen_range``'s), whatever the shared model spells.
_Spellings: type[GenerationOptions] = create_model(  # type: ignore[call-overload]
    "_OllamaSpellings", __base__=GenerationOptions, tfs=_respelled("tfs", add=("tfs_z",)),
    rep_pen_range=_respelled("rep_pen_range", drop=("repeat_last_n",)))


class OllamaOptions(_Spellings):  # type: ignore[misc, valid-type]
    """``options``: every sampler the other routes take, plus Ollama's own names. Ollama's
    hardware options (``num_gpu``, ``num_thread``, ``use_mmap``...) and ``num_keep`` are ignored."""

    num_predict: NumPredict | None = None  # type: ignore[valid-type]
    num_ctx: Count | None = Field(None, description="context size, capped by the server's")
    repeat_last_n: RepeatLastN | None = None  # type: ignore[valid-type]

    def max_tokens(self) -> int | None:
        """The reply's token limit, or None for "until the context is full" (Ollama's -1)."""
        return self.num_predict if self.num_predict is not None and self.num_predict > 0 else None

    def ollama_sampling(self, defaults: GenerationDefaults) -> SamplingParams:
        """The engine's sampler settings: Ollama's defaults where a sampler is not sent."""
        ours = replace(defaults, **OLLAMA_DEFAULTS)
        if self.repeat_last_n is not None:
            ours = replace(ours, rep_pen_range=max(self.repeat_last_n, 0))  # our 0 is the whole context
        params = self.sampling(ours)
        if self.repeat_last_n == 0 and self.rep_pen_range is None:  # Ollama's "no look-back": no penalty
            params = replace(params, rep_pen=1.0, presence_penalty=0.0, frequency_penalty=0.0)
        return params


class OllamaBody(RequestModel):
    """What /api/generate and /api/chat share."""

    model: str | None = Field(None, description="any name: the loaded model answers")
    stream: Bool | None = Field(None, description="default true: NDJSON, one JSON object per line")
    format: Format | None = None
    options: OllamaOptions | None = None
    keep_alive: KeepAlive | None = None
    think: Think | None = None
    logprobs: Bool | None = None
    top_logprobs: number(0, 20, integer=True) | None = None  # type: ignore[valid-type]

    @property
    def streaming(self) -> bool:
        return self.stream is not False

    @property
    def unloading(self) -> bool:
        """``keep_alive`` of zero: a load request that asks for an unload."""
        value = self.keep_alive
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value == 0
        return isinstance(value, str) and value.strip().rstrip("smh").strip() in ("0", "0.0")

    @property
    def sampler_options(self) -> OllamaOptions:
        return self.options or OllamaOptions()

    def constraint(self) -> Constraint | None:
        """``format``, else a ``grammar`` in ``options`` (the shared field)."""
        return self.format if self.format is not None else self.sampler_options.constraint()

    def top_logprob_count(self) -> int | None:
        """How many alternatives to record per token (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class OllamaGenerateBody(OllamaBody):
    prompt: str = ""
    suffix: NoSuffix | None = None  # type: ignore[valid-type]
    system: str | None = Field(None, description="a system message before the prompt (ignored with raw)")
    template: NoTemplate | None = None  # type: ignore[valid-type]
    context: TokenIds | None = Field(None, description="token ids from an earlier reply, put before the prompt")
    raw: Bool | None = Field(None, description="true: the prompt is sent as is, without the chat template")
    images: NoImages | None = None  # type: ignore[valid-type]


class OllamaMessage(RequestModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: NoImages | None = None  # type: ignore[valid-type]
    tool_calls: list[dict[str, Any]] | None = Field(None, description="an assistant turn's calls")
    tool_name: str | None = Field(None, description="a tool message: the function that answered")

    def as_dict(self, template_renders_tools: bool) -> dict[str, Any]:
        """An earlier turn's calls kept for a template that renders them, else written into its
        text as the model is asked to write calls."""
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls and template_renders_tools:
            message["tool_calls"] = self.tool_calls
        elif self.tool_calls:
            message["content"] = (self.content + "\n" if self.content else "") + call_text(self.tool_calls)
        if self.tool_name is not None:
            message["name"] = self.tool_name
        return message


class OllamaChatBody(OllamaBody):
    #: The reply is held to the tools' calls, so a ``format`` or a grammar cannot also hold it.
    SCHEMA_RULES: ClassVar[list[dict[str, Any]]] = [
        not_together("tools", "format"),
        not_together("tools", "options", {"anyOf": [{"required": [name]} for name in GRAMMAR_FIELDS]})]

    messages: list[OllamaMessage] = Field(default_factory=list, description="none: a load request")
    tools: list[Tool] | None = Field(None, max_length=128, description="functions the model may call")

    def toolset(self) -> Toolset | None:
        """Ollama has no ``tool_choice``: the model calls a function or answers in text."""
        toolset = Toolset.from_request([tool.model_dump(exclude_none=True) for tool in self.tools or ()], "auto")
        if toolset is not None and self.constraint() is not None:
            raise ValidationError({"tools": ["Send tools or a format/grammar, not both."]})
        return toolset


class OllamaShowBody(RequestModel):
    model: str | None = spellings("model", "name", description="any name: the loaded model is described")
    verbose: Bool | None = None
