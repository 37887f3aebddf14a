"""The generation options every route family shares, read the same way everywhere.

Sampling, stop strings, EOS bans, phrase bans and ``n`` mean the same on the Kobold, OpenAI,
chat and text-generation-webui routes, whichever spelling a client uses: each reader here
knows every alias, every lenient form and every bound, so the routes cannot drift apart.
"""

from __future__ import annotations

from ..engine.sampling import (
    DEFAULT_DRY_SEQUENCE_BREAKERS, SamplingParams, TokenSampler, normalize_sampler_order,
)
from ..settings import GenerationDefaults
from .fields import FieldReader

MAX_STOP_STRINGS = 256
MAX_BANNED_PHRASES = 256
MAX_BANNED_PHRASE_CHARS = 200
#: Results per request (``n``), on every route: KoboldAI United's bound (they decode together
#: in one batch).
MAX_N = 5


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
    return any([reader.boolean(name, default=False)
                for name in ("ban_eos_token", "use_default_badwordsids", "bypass_eos", "ignore_eos")])


def read_n(reader: FieldReader) -> int:
    return reader.integer("n", default=1, minimum=1, maximum=MAX_N)


def read_sampling(reader: FieldReader, defaults: GenerationDefaults) -> SamplingParams:
    """The sampler fields shared by the Kobold, chat and OpenAI routes (KoboldCpp's extras included)."""
    rep_pen_values = [
        reader.number(name, default=1.0, minimum=0.0)
        for name in ("rep_pen", "repetition_penalty", "repeat_penalty") if reader.has(name)
    ]
    seed = reader.integer("sampler_seed", "seed", default=-1, minimum=-1, maximum=2**64 - 1)
    # text-generation-webui's do_sample false means greedy, whatever the temperature says.
    greedy = not reader.boolean("do_sample", default=True)
    params = SamplingParams(
        temperature=0.0 if greedy else reader.number("temperature", default=defaults.temperature, minimum=0.0),
        top_k=reader.integer("top_k", default=defaults.top_k, minimum=0),
        top_a=reader.number("top_a", default=defaults.top_a, minimum=0.0),
        top_p=reader.number("top_p", default=defaults.top_p, minimum=0.0, maximum=1.0),
        tfs=reader.number("tfs", default=defaults.tfs, minimum=0.0, maximum=1.0),
        typical=reader.number("typical", "typical_p", default=defaults.typical, minimum=0.0, maximum=1.0),
        min_p=reader.number("min_p", default=defaults.min_p, minimum=0.0, maximum=1.0),
        rep_pen=max(rep_pen_values) if rep_pen_values else defaults.rep_pen,
        rep_pen_range=reader.integer("rep_pen_range", "repetition_penalty_range",
                                     default=defaults.rep_pen_range, minimum=0),
        rep_pen_slope=reader.number("rep_pen_slope", default=defaults.rep_pen_slope, minimum=0.0),
        presence_penalty=reader.number("presence_penalty", default=0.0, minimum=-2.0, maximum=2.0),
        frequency_penalty=reader.number("frequency_penalty", default=0.0, minimum=-2.0, maximum=2.0),
        sampler_order=_sampler_order(reader, defaults),
        seed=seed if seed >= 0 else None,
        logit_bias=reader.token_bias("logit_bias"),
        banned_token_ids=_custom_token_bans(reader),
        # Upper bounds far above any useful setting keep a request from overflowing the maths
        # (a 500 mid-generation) or allocating without limit.
        mirostat=reader.integer("mirostat", "mirostat_mode", default=0, minimum=0, maximum=2),
        mirostat_tau=reader.number("mirostat_tau", default=5.0, minimum=0.0, maximum=100.0),
        mirostat_eta=reader.number("mirostat_eta", default=0.1, minimum=0.0, maximum=1.0),
        dynatemp_range=reader.number("dynatemp_range", default=0.0, minimum=0.0, maximum=100.0),
        dynatemp_exponent=reader.number("dynatemp_exponent", default=1.0, minimum=0.0, maximum=100.0),
        smoothing_factor=reader.number("smoothing_factor", default=0.0, minimum=0.0, maximum=100.0),
        smoothing_curve=reader.number("smoothing_curve", default=1.0, maximum=10.0),
        xtc_threshold=reader.number("xtc_threshold", default=0.2, maximum=1.0),
        xtc_probability=reader.number("xtc_probability", default=0.0, minimum=0.0, maximum=1.0),
        dry_multiplier=reader.number("dry_multiplier", default=0.0, minimum=0.0, maximum=100.0),
        dry_base=reader.number("dry_base", default=1.75, maximum=100.0),
        dry_allowed_length=reader.integer("dry_allowed_length", default=2, maximum=1000),
        dry_penalty_last_n=reader.integer("dry_penalty_last_n", default=320, minimum=-1),
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
    the field its message names."""
    try:
        TokenSampler(params)
    except ValueError as exc:
        name = str(exc).split(" ", 1)[0]
        reader.errors.setdefault(name if hasattr(params, name) else "sampler", []).append(str(exc))


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
