"""KoboldAI GenerationInput: every field, its aliases, defaults and validation.

Ranges follow KoboldAI United's schema (so 422 bodies look like United's), the extra
keys follow KoboldCpp, and text-generation-webui's names are accepted as aliases.
Unknown keys are ignored, as United does since API 1.2.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BeforeValidator, Field, WithJsonSchema, create_model
from pydantic_core import PydanticCustomError

from ...engine.constraints import Constraint
from ...engine.generation import GenerationRequest
from ...engine.sampling import SamplingParams
from ...settings import GenerationDefaults
from ..generation_options import GRAMMAR_FIELDS, N, GenerationOptions, not_together
from ..errors import ValidationError
from ..logprobs import KOBOLD_TOP_LOGPROBS
from ..tools import ToolFields, Toolset
from ..request_model import Bool, Count, JsonSchema, RequestModel, TokenIds, spellings


@dataclass
class KoboldGenerationInput:
    """A validated /api/v1/generate body."""

    prompt: str
    memory: str
    max_length: int
    max_context_length: int
    sampling: SamplingParams
    stop_strings: list[str]
    trim_stop: bool
    ban_eos: bool
    n: int
    genkey: str
    banned_phrases: list[str]
    constraint: Constraint | None = None
    logprobs: bool = False
    toolset: Toolset | None = None

    def to_request(self, copy: int = 0) -> GenerationRequest:
        """The engine request for result number ``copy`` of ``n``."""
        return GenerationRequest(
            prompt=self.prompt,
            memory=self.memory,
            max_new_tokens=self.max_length,
            max_context_length=self.max_context_length,
            sampling=self.sampling.for_copy(copy),
            stop_strings=self.stop_strings,
            trim_stop=self.trim_stop,
            ban_eos=self.ban_eos,
            banned_phrases=self.banned_phrases,
            constraint=self.constraint,
            logprobs=KOBOLD_TOP_LOGPROBS if self.logprobs else None,
        )


#: Client-side options of KoboldAI's UI: validated for the shape of a 422, without effect here
#: (memory and world info are the client's).
CLIENT_SIDE_FLAGS = ("quiet", "use_story", "use_memory", "use_authors_note", "use_world_info", "use_userscripts",
                     "singleline", "frmttriminc", "frmtrmblln", "frmtrmspch", "frmtadsnsp",
                     "disable_input_formatting", "sampler_full_determinism")
_WithClientFlags: type[GenerationOptions] = create_model(  # type: ignore[call-overload]
    "KoboldClientFlags", __base__=GenerationOptions, **{flag: (Bool | None, None) for flag in CLIENT_SIDE_FLAGS})


class KoboldGenerateBody(_WithClientFlags, ToolFields):  # type: ignore[misc, valid-type]
    """KoboldAI's GenerationInput: ranges after KoboldAI United (so a 422 reads like United's), the
    extra keys after KoboldCpp, text-generation-webui's names as further spellings."""

    SCHEMA_RULES: ClassVar[list[dict[str, Any]]] = [not_together("tools", GRAMMAR_FIELDS)]

    prompt: str
    memory: str | None = None
    max_length: Count | None = spellings(  # type: ignore[valid-type]
        "max_length", "max_new_tokens", "max_tokens", "n_predict", "num_predict", description="tokens to generate")
    max_context_length: Count | None = spellings(  # type: ignore[valid-type]
        "max_context_length", "truncation_length", "num_ctx",
        description="the prompt is cut to this minus max_length")
    logprobs: Bool | None = Field(None, description="return each token's logprob and the 10 likeliest alternatives")
    trim_stop: Bool | None = Field(None, description="cut the stop string from the output (default true)")
    n: N | None = None  # type: ignore[valid-type]
    genkey: str | None = None

    def to_input(self, defaults: GenerationDefaults) -> KoboldGenerationInput:
        toolset, constraint, prompt = self.toolset(), self.constraint(), self.prompt
        if toolset is not None:  # KoboldCpp: the reply is held to the calls' JSON grammar
            if constraint is not None:
                raise ValidationError({"tools": ["Send tools or a grammar, not both."]})
            constraint, prompt = toolset.constraint(), f"{toolset.instructions()}\n\n{prompt}"
        return KoboldGenerationInput(
            prompt=prompt,
            memory=self.memory or "",
            max_length=self.max_length or defaults.max_length,
            max_context_length=self.max_context_length or defaults.max_context_length,
            sampling=self.sampling(defaults),
            stop_strings=self.stop_strings,
            trim_stop=defaults.trim_stop if self.trim_stop is None else self.trim_stop,
            ban_eos=self.ban_eos,
            n=self.n or 1,
            genkey=self.genkey or "",
            banned_phrases=self.banned_phrases,
            constraint=constraint,
            logprobs=bool(self.logprobs),
            toolset=toolset,
        )


def parse_generation_input(body: Any, defaults: GenerationDefaults) -> KoboldGenerationInput:
    """Validate a Kobold generate body; raises ValidationError (422) listing every bad field."""
    return KoboldGenerateBody.parse(body).to_input(defaults)


class TokenCountBody(RequestModel):
    prompt: str | None = spellings("prompt", "content", "text")


class DetokenizeBody(RequestModel):
    ids: TokenIds | None = spellings("ids", "tokens")


class GenkeyBody(RequestModel):
    """Which generation to check or abort; anything but a string means "the caller's" (SillyTavern
    sends no body at all to abort)."""

    genkey: Annotated[str | None, BeforeValidator(lambda value: value if isinstance(value, str) else None)] = None


def _no_soft_prompt(name: str) -> str:
    if name:
        raise PydanticCustomError("soft_prompt", "No soft prompts are available on this server.")
    return name


class SoftPromptBody(RequestModel):
    """Soft prompts do not exist here: only "none" (an empty name) can be set."""

    value: Annotated[str, AfterValidator(_no_soft_prompt), WithJsonSchema({"const": ""})] | None = None


class JsonToGrammarBody(RequestModel):
    """``{"schema": {...}}``, or the schema itself as the body (KoboldCpp takes both)."""

    schema_: JsonSchema | Literal[True] = Field(validation_alias="schema", serialization_alias="schema")

    @classmethod
    def read(cls, body: dict[str, Any]) -> dict[str, Any] | bool:
        if isinstance(body.get("schema"), (dict, bool)):
            return cls.parse(body).schema_
        return body
