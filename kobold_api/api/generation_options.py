"""The generation options every route family shares: one model, read the same way everywhere.

Sampling, stop strings, EOS bans and phrase bans mean the same on the Kobold, OpenAI, chat and
text-generation-webui routes, whichever spelling a client uses. :class:`GenerationOptions` knows
every spelling, lenient form and bound; each family's body model extends it with its own fields,
so the routes cannot drift apart and the document describes exactly what is validated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BeforeValidator, Field, WithJsonSchema, create_model, model_validator
from pydantic_core import PydanticCustomError

from ..engine.constraints import Constraint, ConstraintError
from ..engine.guidance import MAX_GUIDANCE_SCALE
from ..engine.thinking import REASONING_EFFORTS
from ..engine.sampling import (
    SamplingParams, SettingError, TokenSampler, normalize_sampler_order,
)
from ..settings import GenerationDefaults
from .errors import ValidationError
from .request_model import (
    Bool, CommaStrings, Grammar, RequestModel, StringList, TokenBias, TokenIds, number, spellings, to_int_list,
)

MAX_STOP_STRINGS = 256
MAX_BANNED_PHRASES = 256
MAX_BANNED_PHRASE_CHARS = 200
#: Results per request (``n``), on every route: KoboldAI United's bound (they decode together
#: in one batch).
MAX_N = 5
#: ``n`` where a route has it.
N = number(1, MAX_N, integer=True, description="results to generate")

STOP_STRING_FIELDS = ("stop_sequence", "stop", "stopping_strings", "custom_stopping_strings")
EOS_BAN_FIELDS = ("ban_eos_token", "use_default_badwordsids", "bypass_eos", "ignore_eos")


@dataclass(frozen=True)
class Sampler:
    """One numeric sampler setting: its spellings and the bounds it is always held to. ``each``:
    every spelling is read on its own and the largest wins (clients send several at once).
    ``minimum_while_on``: a bound the engine holds the setting to only while its sampler is on (a
    client may leave a stale value for one it turned off); the document states it plainly."""

    names: tuple[str, ...]
    minimum: float | None = None
    maximum: float | None = None
    integer: bool = False
    description: str | None = None
    each: bool = False
    minimum_while_on: float | None = None

    def fields(self) -> dict[str, Any]:
        """The model fields this setting declares."""
        documented = None if self.minimum_while_on is None else {"minimum": self.minimum_while_on}
        kind = number(self.minimum, self.maximum, integer=self.integer, description=self.description,
                      schema_extra=documented)
        if self.each or len(self.names) == 1:
            return {name: (kind | None, None) for name in self.names}
        return {self.names[0]: (kind | None, spellings(*self.names))}


#: Upper bounds far above any useful setting keep a request from overflowing the maths (a 500
#: mid-generation) or allocating without limit.
SAMPLERS: dict[str, Sampler] = {sampler.names[0]: sampler for sampler in (
    Sampler(("temperature",), 0.0),
    Sampler(("top_k",), 0, integer=True, description="0 = off"),
    Sampler(("top_a",), 0.0),
    Sampler(("top_p",), 0.0, 1.0),
    Sampler(("tfs",), 0.0, 1.0),
    Sampler(("typical", "typical_p"), 0.0, 1.0),
    Sampler(("min_p",), 0.0, 1.0),
    Sampler(("rep_pen", "repetition_penalty", "repeat_penalty"), 0.0, description="0 or 1 = off", each=True),
    Sampler(("rep_pen_range", "repetition_penalty_range", "repeat_last_n"), 0, integer=True),
    Sampler(("rep_pen_slope",), 0.0),
    Sampler(("presence_penalty",), -2.0, 2.0),
    Sampler(("frequency_penalty",), -2.0, 2.0),
    Sampler(("sampler_seed", "seed"), -1, 2**64 - 1, integer=True, description="-1 or absent: random"),
    Sampler(("mirostat", "mirostat_mode"), 0, 2, integer=True, description="1 or 2: Mirostat v1/v2"),
    Sampler(("mirostat_tau",), 0.0, 100.0),
    Sampler(("mirostat_eta",), 0.0, 1.0),
    Sampler(("dynatemp_range",), 0.0, 100.0, description="temperature +- range, by the entropy"),
    Sampler(("dynatemp_exponent",), 0.0, 100.0),
    Sampler(("smoothing_factor",), 0.0, 100.0, description="quadratic sampling; 0 = off"),
    Sampler(("smoothing_curve",), None, 10.0, description="at least 1 while smoothing_factor is on",
            minimum_while_on=1.0),
    Sampler(("xtc_threshold",), None, 1.0, description="0 to 1 while xtc_probability is on", minimum_while_on=0.0),
    Sampler(("xtc_probability",), 0.0, 1.0),
    Sampler(("dry_multiplier",), 0.0, 100.0, description="DRY repetition penalty; 0 = off"),
    Sampler(("dry_base",), None, 100.0, description="at least 1 while dry_multiplier is on", minimum_while_on=1.0),
    Sampler(("dry_allowed_length",), None, 1000, integer=True, description="at least 1 while dry_multiplier is on",
            minimum_while_on=1),
    Sampler(("dry_penalty_last_n",), -1, integer=True, description="0 or -1: the whole context"),
    Sampler(("nsigma", "top_n_sigma"), 0.0, 100.0, description="top-n-sigma: keep logits >= max - n * std; 0 = off"),
    Sampler(("adaptive_target",), None, 1.0, description="Adaptive-P target probability; negative = off"),
    Sampler(("adaptive_decay",), 0.0, 0.99, description="Adaptive-P history decay per token"),
    Sampler(("dynatemp_low",), 0.0, 100.0, description="dynamic temperature's lowest (with dynatemp_high)"),
    Sampler(("dynatemp_high",), 0.0, 100.0, description="dynamic temperature's highest (with dynatemp_low)"),
    Sampler(("guidance_scale",), 0.0, MAX_GUIDANCE_SCALE,
            description="classifier-free guidance against negative_prompt; 1 = off"),
    Sampler(("thinking_budget_tokens",), 0, integer=True,
            description="tokens a reasoning block may hold before its closing tag is forced"),
    Sampler(("min_keep",), 0, integer=True, description="accepted; every truncation here keeps at least the best "
                                                        "token"),
)}
#: Settings named as the engine names them, with no server setting for a default.
_ENGINE_DEFAULTED = ("presence_penalty", "frequency_penalty", "mirostat", "mirostat_tau", "mirostat_eta",
                     "dynatemp_range", "dynatemp_exponent", "smoothing_factor", "smoothing_curve", "xtc_threshold",
                     "xtc_probability", "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n",
                     "dry_sequence_breakers", "nsigma", "adaptive_target", "adaptive_decay", "guidance_scale",
                     "negative_prompt", "reasoning_effort", "thinking_budget_tokens")


def _sampler_order(value: list[int]) -> list[int]:
    try:
        return normalize_sampler_order(value)
    except ValueError as exc:
        raise PydanticCustomError("sampler_order", str(exc)) from None


SamplerOrder = Annotated[list[int], BeforeValidator(to_int_list), AfterValidator(_sampler_order), WithJsonSchema(
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 6}, "minItems": 1, "maxItems": 7,
     "uniqueItems": True, "description": "ids 0 top_k, 1 top_a, 2 top_p, 3 tfs, 4 typical, 5 temperature, 6 rep_pen"})]

_SamplerFields: type[RequestModel] = create_model(  # type: ignore[call-overload]
    "SamplerFields", __base__=RequestModel,
    **{name: spec for sampler in SAMPLERS.values() for name, spec in sampler.fields().items()})


class GenerationOptions(_SamplerFields):  # type: ignore[misc, valid-type]
    """Samplers, stop strings, EOS and phrase bans: what every generating route accepts."""

    sampler_order: SamplerOrder | None = None
    logit_bias: TokenBias | None = None
    custom_token_bans: TokenIds | None = Field(None, description="token ids never generated")
    dry_sequence_breakers: StringList | None = None
    do_sample: Bool | None = Field(None, description="false: greedy (text-generation-webui)")
    dynamic_temperature: Bool | None = Field(None, description="false: dynatemp_low/high are ignored")
    stop_sequence: StringList | None = None
    stop: StringList | None = None
    stopping_strings: StringList | None = None
    custom_stopping_strings: CommaStrings | None = None
    ban_eos_token: Bool | None = None
    use_default_badwordsids: Bool | None = None
    bypass_eos: Bool | None = None
    ignore_eos: Bool | None = None
    banned_strings: StringList | None = spellings("banned_strings", "banned_tokens",
                                                 description="phrases never written")
    grammar: Grammar | None = spellings("grammar", "grammar_string")
    grammar_retain_state: Bool | None = Field(None, description="continue the last generation's grammar state")
    negative_prompt: str | None = Field(None, description="what guidance_scale steers away from (empty: the last "
                                                          "prompt token alone)")
    reasoning_effort: Literal[REASONING_EFFORTS] | None = Field(  # type: ignore[valid-type]
        None, description="a reasoning block's share of max tokens: none 0, minimal 10%, low 25%, medium 50%, "
                          "high/xhigh unbounded")

    #: Cross-field rules for the document, per family (see :func:`not_together`).
    SCHEMA_RULES: ClassVar[list[dict[str, Any]]] = []

    @model_validator(mode="after")
    def _bounded_lists(self) -> "GenerationOptions":
        """The caps on merged lists (a client's many stop strings or phrase bans cost every token)."""
        if len(self.stop_strings) > MAX_STOP_STRINGS:
            raise ValidationError({"stop_sequence": [f"Longer than maximum length {MAX_STOP_STRINGS}."]})
        phrases = self.banned_phrases
        if len(phrases) > MAX_BANNED_PHRASES or any(len(phrase) > MAX_BANNED_PHRASE_CHARS for phrase in phrases):
            raise ValidationError({"banned_strings": [
                f"At most {MAX_BANNED_PHRASES} phrases of at most {MAX_BANNED_PHRASE_CHARS} characters."]})
        return self

    @property
    def stop_strings(self) -> list[str]:
        """Stop strings from every spelling clients use: ``stop_sequence`` (Kobold), ``stop``
        (OpenAI), ``stopping_strings`` and ``custom_stopping_strings`` (text-generation-webui),
        merged in that order without duplicates."""
        merged = [*(self.stop_sequence or ()), *(self.stop or ()), *(self.stopping_strings or ()),
                  *(self.custom_stopping_strings or ())]
        return list(dict.fromkeys(merged))

    @property
    def ban_eos(self) -> bool:
        """Whether the end-of-sequence token is banned, by any client's name for it."""
        return any(getattr(self, name) for name in EOS_BAN_FIELDS)

    @property
    def banned_phrases(self) -> list[str]:
        """KoboldCpp's phrase bans: text the model may never write."""
        return list(self.banned_strings or ())

    def constraint(self) -> Constraint | None:
        """The ``grammar`` compiled (an empty one is none); a bad grammar is a 422 that names the problem."""
        if not self.grammar or not self.grammar.strip():
            return None
        try:
            return Constraint.from_grammar(self.grammar, bool(self.grammar_retain_state))
        except ConstraintError as exc:
            raise ValidationError({"grammar": [str(exc)]}) from None

    def sampling(self, defaults: GenerationDefaults) -> SamplingParams:
        """The engine's sampler settings, ``defaults`` where a field was not sent. The settings
        the engine checks only while their sampler is on are judged by building the chain once;
        a refusal is a 422 under the field it names."""
        def value(name: str, default: Any) -> Any:
            given = getattr(self, name)
            return default if given is None else given

        rep_pens = [getattr(self, name) for name in SAMPLERS["rep_pen"].names if getattr(self, name) is not None]
        seed = value("sampler_seed", -1)
        greedy = self.do_sample is False  # text-generation-webui: greedy, whatever the temperature says
        # KoboldCpp's extra samplers: the engine's own defaults (all "off") where a field was not sent.
        extras = {name: getattr(self, name) for name in _ENGINE_DEFAULTED if getattr(self, name) is not None}
        temperature = value("temperature", defaults.temperature)
        low, high = self.dynatemp_low, self.dynatemp_high
        if low is not None and high is not None and self.dynamic_temperature is not False \
                and self.dynatemp_range is None and high > low:
            # text-generation-webui's spelling: a span instead of a centre and a range.
            temperature, extras["dynatemp_range"] = (low + high) / 2, (high - low) / 2
        params = SamplingParams(
            temperature=0.0 if greedy else temperature,
            top_k=value("top_k", defaults.top_k),
            top_a=value("top_a", defaults.top_a),
            top_p=value("top_p", defaults.top_p),
            tfs=value("tfs", defaults.tfs),
            typical=value("typical", defaults.typical),
            min_p=value("min_p", defaults.min_p),
            rep_pen=max(rep_pens) if rep_pens else defaults.rep_pen,
            rep_pen_range=value("rep_pen_range", defaults.rep_pen_range),
            rep_pen_slope=value("rep_pen_slope", defaults.rep_pen_slope),
            sampler_order=value("sampler_order", list(defaults.sampler_order)),
            seed=seed if seed >= 0 else None,
            logit_bias=value("logit_bias", {}),
            banned_token_ids=value("custom_token_bans", []),
            **extras,
        )
        try:
            TokenSampler(params)
        except SettingError as exc:
            raise ValidationError({exc.field: [str(exc)]}) from None
        return params


GRAMMAR_FIELDS = ("grammar", "grammar_string")


def not_together(first: str | tuple[str, ...], second: str | tuple[str, ...],
                 second_schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """A document rule: a body does not carry ``first`` and ``second`` (any of their spellings;
    ``second_schema``: only where ``second`` looks like that)."""
    firsts = (first,) if isinstance(first, str) else first
    seconds = (second,) if isinstance(second, str) else second
    return {"not": {"anyOf": [{"required": [a, b], **({"properties": {b: second_schema}} if second_schema else {})}
                              for a in firsts for b in seconds]}}
