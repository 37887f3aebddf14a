"""The generation options every route family shares, read the same way everywhere.

Sampling, stop strings, EOS bans, phrase bans and ``n`` mean the same on the Kobold, OpenAI,
chat and text-generation-webui routes, whichever spelling a client uses: each reader here
knows every alias, every lenient form and every bound, so the routes cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..engine.sampling import (
    DEFAULT_DRY_SEQUENCE_BREAKERS, SamplingParams, SettingError, TokenSampler, normalize_sampler_order,
)
from ..settings import GenerationDefaults
from .fields import FieldReader

MAX_STOP_STRINGS = 256
MAX_BANNED_PHRASES = 256
MAX_BANNED_PHRASE_CHARS = 200
#: Results per request (``n``), on every route: KoboldAI United's bound (they decode together
#: in one batch).
MAX_N = 5


STOP_STRING_FIELDS = ("stop_sequence", "stop", "stopping_strings", "custom_stopping_strings")
EOS_BAN_FIELDS = ("ban_eos_token", "use_default_badwordsids", "bypass_eos", "ignore_eos")


def read_stop_strings(reader: FieldReader) -> list[str]:
    """Stop strings from every spelling clients use: ``stop_sequence`` (Kobold), ``stop`` (OpenAI,
    a string or a list), ``stopping_strings`` (text-generation-webui), ``custom_stopping_strings``
    (its old UI: a list, a JSON list or a comma list). Merged in that order, duplicates and
    empty strings dropped, at most :data:`MAX_STOP_STRINGS`."""
    stops = (reader.string_list("stop_sequence") + reader.string_list("stop")
             + reader.string_list("stopping_strings") + reader.comma_strings("custom_stopping_strings"))
    stops = list(dict.fromkeys(stops))
    if len(stops) > MAX_STOP_STRINGS:
        reader.errors.setdefault("stop_sequence", []).append(f"Longer than maximum length {MAX_STOP_STRINGS}.")
    return stops


def read_ban_eos(reader: FieldReader) -> bool:
    """Whether the end-of-sequence token is banned, by any client's name for it."""
    return any([reader.boolean(name, default=False) for name in EOS_BAN_FIELDS])


def read_n(reader: FieldReader) -> int:
    return reader.integer("n", default=1, minimum=1, maximum=MAX_N)


@dataclass(frozen=True)
class Number:
    """One numeric field: its wire name, the other spellings clients send, and the bounds it is
    always held to. The readers validate with it and the OpenAPI document is written from it."""

    names: tuple[str, ...]
    minimum: float | None = None
    maximum: float | None = None
    integer: bool = False
    description: str = ""

    def read(self, reader: FieldReader, default: Any) -> Any:
        if self.integer:
            return reader.integer(*self.names, default=default, minimum=self.minimum, maximum=self.maximum)
        return reader.number(*self.names, default=default, minimum=self.minimum, maximum=self.maximum)

    def schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "integer" if self.integer else "number"}
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        if self.description:
            schema["description"] = self.description
        return schema


#: Upper bounds far above any useful setting keep a request from overflowing the maths (a 500
#: mid-generation) or allocating without limit.
SAMPLER_NUMBERS: dict[str, Number] = {field.names[0]: field for field in (
    Number(("temperature",), 0.0),
    Number(("top_k",), 0, integer=True, description="0 = off"),
    Number(("top_a",), 0.0),
    Number(("top_p",), 0.0, 1.0),
    Number(("tfs",), 0.0, 1.0),
    Number(("typical", "typical_p"), 0.0, 1.0),
    Number(("min_p",), 0.0, 1.0),
    Number(("rep_pen", "repetition_penalty", "repeat_penalty"), 0.0, description="0 or 1 = off"),
    Number(("rep_pen_range", "repetition_penalty_range"), 0, integer=True),
    Number(("rep_pen_slope",), 0.0),
    Number(("presence_penalty",), -2.0, 2.0),
    Number(("frequency_penalty",), -2.0, 2.0),
    Number(("sampler_seed", "seed"), -1, 2**64 - 1, integer=True, description="-1 or absent: random"),
    Number(("mirostat", "mirostat_mode"), 0, 2, integer=True, description="1 or 2: Mirostat v1/v2"),
    Number(("mirostat_tau",), 0.0, 100.0),
    Number(("mirostat_eta",), 0.0, 1.0),
    Number(("dynatemp_range",), 0.0, 100.0, description="temperature +- range, by the entropy"),
    Number(("dynatemp_exponent",), 0.0, 100.0),
    Number(("smoothing_factor",), 0.0, 100.0, description="quadratic sampling; 0 = off"),
    Number(("smoothing_curve",), None, 10.0, description="at least 1 while smoothing_factor is on"),
    Number(("xtc_threshold",), None, 1.0, description="0 to 1 while xtc_probability is on"),
    Number(("xtc_probability",), 0.0, 1.0),
    Number(("dry_multiplier",), 0.0, 100.0, description="DRY repetition penalty; 0 = off"),
    Number(("dry_base",), None, 100.0, description="at least 1 while dry_multiplier is on"),
    Number(("dry_allowed_length",), None, 1000, integer=True, description="at least 1 while dry_multiplier is on"),
    Number(("dry_penalty_last_n",), -1, integer=True, description="0 or -1: the whole context"),
)}
#: What a sampler demands of its settings only while it is on (a client may leave stale values
#: for one it turned off): (the switch, its "off" value, {setting: minimum while on}).
WHILE_ON: tuple[tuple[str, float, dict[str, float]], ...] = (
    ("smoothing_factor", 0.0, {"smoothing_curve": 1.0}),
    ("xtc_probability", 0.0, {"xtc_threshold": 0.0}),
    ("dry_multiplier", 0.0, {"dry_base": 1.0, "dry_allowed_length": 1}),
)


def sampler_schema() -> dict[str, Any]:
    """The sampler fields as JSON Schema: ``properties`` (every spelling) and ``allOf`` (the
    while-on rules), from the same table the reader validates with."""
    properties = {name: field.schema() for field in SAMPLER_NUMBERS.values() for name in field.names}
    properties.update({
        "sampler_order": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 6},
                          "minItems": 1, "maxItems": 7, "uniqueItems": True,
                          "description": "ids 0 top_k, 1 top_a, 2 top_p, 3 tfs, 4 typical, 5 temperature, 6 rep_pen"},
        "logit_bias": {"type": "object", "propertyNames": {"pattern": "^[0-9]+$"},
                       "additionalProperties": {"type": "number"}, "description": "token id -> bias (clamped to +-100)"},
        "dry_sequence_breakers": {"description": "list of strings, or that list JSON-encoded (as SillyTavern sends)"},
        "do_sample": {"type": "boolean", "description": "false: greedy (text-generation-webui)"},
    })
    rules = [{"anyOf": [{"properties": {switch: {"type": "number", "maximum": off, "minimum": off}}},
                        {"properties": {name: {"minimum": minimum} for name, minimum in settings.items()}}]}
             for switch, off, settings in WHILE_ON]
    return {"properties": properties, "allOf": rules}


def read_sampling(reader: FieldReader, defaults: GenerationDefaults) -> SamplingParams:
    """The sampler fields shared by the Kobold, chat and OpenAI routes (KoboldCpp's extras included)."""
    fields = SAMPLER_NUMBERS
    rep_pen = fields["rep_pen"]
    rep_pen_values = [Number((name,), rep_pen.minimum).read(reader, 1.0) for name in rep_pen.names if reader.has(name)]
    seed = fields["sampler_seed"].read(reader, -1)
    # text-generation-webui's do_sample false means greedy, whatever the temperature says.
    greedy = not reader.boolean("do_sample", default=True)
    temperature = fields["temperature"].read(reader, defaults.temperature)
    params = SamplingParams(
        temperature=0.0 if greedy else temperature,
        top_k=fields["top_k"].read(reader, defaults.top_k),
        top_a=fields["top_a"].read(reader, defaults.top_a),
        top_p=fields["top_p"].read(reader, defaults.top_p),
        tfs=fields["tfs"].read(reader, defaults.tfs),
        typical=fields["typical"].read(reader, defaults.typical),
        min_p=fields["min_p"].read(reader, defaults.min_p),
        rep_pen=max(rep_pen_values) if rep_pen_values else defaults.rep_pen,
        rep_pen_range=fields["rep_pen_range"].read(reader, defaults.rep_pen_range),
        rep_pen_slope=fields["rep_pen_slope"].read(reader, defaults.rep_pen_slope),
        presence_penalty=fields["presence_penalty"].read(reader, 0.0),
        frequency_penalty=fields["frequency_penalty"].read(reader, 0.0),
        sampler_order=_sampler_order(reader, defaults),
        seed=seed if seed >= 0 else None,
        logit_bias=reader.token_bias("logit_bias"),
        banned_token_ids=_custom_token_bans(reader),
        mirostat=fields["mirostat"].read(reader, 0),
        mirostat_tau=fields["mirostat_tau"].read(reader, 5.0),
        mirostat_eta=fields["mirostat_eta"].read(reader, 0.1),
        dynatemp_range=fields["dynatemp_range"].read(reader, 0.0),
        dynatemp_exponent=fields["dynatemp_exponent"].read(reader, 1.0),
        smoothing_factor=fields["smoothing_factor"].read(reader, 0.0),
        smoothing_curve=fields["smoothing_curve"].read(reader, 1.0),
        xtc_threshold=fields["xtc_threshold"].read(reader, 0.2),
        xtc_probability=fields["xtc_probability"].read(reader, 0.0),
        dry_multiplier=fields["dry_multiplier"].read(reader, 0.0),
        dry_base=fields["dry_base"].read(reader, 1.75),
        dry_allowed_length=fields["dry_allowed_length"].read(reader, 2),
        dry_penalty_last_n=fields["dry_penalty_last_n"].read(reader, 320),
        # SillyTavern sends the breakers as a JSON-encoded string
        dry_sequence_breakers=reader.string_list("dry_sequence_breakers") if reader.has("dry_sequence_breakers")
        else list(DEFAULT_DRY_SEQUENCE_BREAKERS),
    )
    if not reader.errors:
        _check_combination(reader, params)
    return params


def read_banned_phrases(reader: FieldReader) -> list[str]:
    """KoboldCpp's phrase bans (``banned_strings``, alias ``banned_tokens``): a list, or a
    JSON-encoded list, of text the model may never write. Bounded, since every token that may
    start a phrase keeps a copy of its logits until the phrase is ruled out."""
    phrases = reader.string_list("banned_strings", "banned_tokens")
    if len(phrases) > MAX_BANNED_PHRASES or any(len(phrase) > MAX_BANNED_PHRASE_CHARS for phrase in phrases):
        reader.errors.setdefault("banned_strings", []).append(
            f"At most {MAX_BANNED_PHRASES} phrases of at most {MAX_BANNED_PHRASE_CHARS} characters.")
        return []
    return phrases


def _check_combination(reader: FieldReader, params: SamplingParams) -> None:
    """Settings checked only when their sampler is on (a client may leave stale values for one it
    turned off) are the engine's to judge: build the chain once and report what it refuses under
    the field it names."""
    try:
        TokenSampler(params)
    except SettingError as exc:
        reader.errors.setdefault(exc.field, []).append(str(exc))


def _sampler_order(reader: FieldReader, defaults: GenerationDefaults) -> list[int]:
    """KoboldCpp's rule (1 to 7 distinct ids; the engine owns it), reported as a 422 field error."""
    order = reader.integer_list("sampler_order")
    if order is None:
        return list(defaults.sampler_order)
    try:
        return normalize_sampler_order(order)
    except ValueError as exc:
        reader.errors.setdefault("sampler_order", []).append(str(exc))
        return list(defaults.sampler_order)


def _custom_token_bans(reader: FieldReader) -> list[int]:
    """KoboldCpp's ``custom_token_bans``: a comma string (or list) of token ids."""
    return reader.token_ids("custom_token_bans")
