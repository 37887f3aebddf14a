"""What every sampler shares: the settings (:class:`SamplingParams`), their validation, the
sampler ids of ``sampler_order``, and the masking and probability-mass helpers."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum
from numbers import Integral, Real
from typing import Protocol

import numpy as np


NEG_INF = np.float32(-np.inf)

# Relative slack when comparing a cumulative probability with a target mass,
# so that e.g. 0.5 + 0.3 computed through a float32 softmax still "reaches" 0.8.
_MASS_RTOL = 1e-6

# Largest magnitude a logit_bias entry may have (OpenAI clamps the same way).
MAX_LOGIT_BIAS = 100.0


class SamplerId(IntEnum):
    """KoboldAI's sampler ids, as used by the ``sampler_order`` wire field."""

    TOP_K = 0
    TOP_A = 1
    TOP_P = 2
    TFS = 3
    TYPICAL = 4
    TEMPERATURE = 5
    REP_PEN = 6


DEFAULT_SAMPLER_ORDER: tuple[int, ...] = (6, 0, 1, 3, 4, 2, 5)

# KoboldCpp's default DRY sequence breakers.
DEFAULT_DRY_SEQUENCE_BREAKERS: tuple[str, ...] = ("\n", ":", "\"", "*")


class LogitsProcessor(Protocol):
    """One step of the sampling chain.

    It may modify ``logits`` in place; callers must use the returned array.
    """

    def __call__(self, logits: np.ndarray, context: np.ndarray) -> np.ndarray: ...


@dataclass
class SamplingParams:
    """Per-request sampling settings, named after the KoboldAI wire fields."""

    temperature: float = 0.7
    top_k: int = 0
    top_a: float = 0.0
    top_p: float = 0.92
    tfs: float = 1.0
    typical: float = 1.0
    min_p: float = 0.0
    rep_pen: float = 1.0
    rep_pen_range: int = 320
    rep_pen_slope: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    sampler_order: list[int] = field(default_factory=lambda: list(DEFAULT_SAMPLER_ORDER))
    seed: int | None = None  # None or negative = random
    logit_bias: dict[int, float] = field(default_factory=dict)
    banned_token_ids: list[int] = field(default_factory=list)
    # KoboldCpp's extra samplers; the defaults are all "off".
    mirostat: int = 0  # 0 off, 1 = Mirostat v1, 2 = Mirostat v2
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    smoothing_factor: float = 0.0
    smoothing_curve: float = 1.0
    xtc_threshold: float = 0.2
    xtc_probability: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 320  # 0 or -1: the whole context
    dry_sequence_breakers: list[str] = field(
        default_factory=lambda: list(DEFAULT_DRY_SEQUENCE_BREAKERS)
    )
    nsigma: float = 0.0  # top-n-sigma; 0 = off
    adaptive_target: float = -1.0  # Adaptive-P; negative = off
    adaptive_decay: float = 0.9
    # Classifier-free guidance (not a sampler in the chain: the generation loop mixes a second
    # context's logits in before the chain runs; see engine/guidance.py). 1 = off.
    guidance_scale: float = 1.0
    negative_prompt: str = ""
    # KoboldCpp's reasoning budget (engine/thinking.py): how long a think block may run before
    # its closing tag is forced. "" and -1: unbounded.
    reasoning_effort: str = ""
    thinking_budget_tokens: int = -1

    def for_copy(self, index: int) -> "SamplingParams":
        """Parameters for the ``index``-th of ``n`` results of one request: seed + index, so
        the copies differ from each other and each can still be replayed."""
        if index == 0 or self.seed is None or self.seed < 0:
            return self
        return replace(self, seed=self.seed + index)


class SettingError(ValueError):
    """A sampler setting out of range; ``field`` is its wire name (what a 422 is filed under)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# --------------------------------------------------------------------------
# Validation helpers: every error names the wire field so clients can fix it.
# --------------------------------------------------------------------------


def _require_real(name: str, value: object) -> float:
    """Accept ints and floats (not bools, not NaN/inf) so JSON numbers work."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise SettingError(name, f"{name} must be a number (got {value!r})")
    number = float(value)
    if not math.isfinite(number):
        raise SettingError(name, f"{name} must be a finite number (got {value!r})")
    return number


def _require_between(name: str, value: object, low: float, high: float) -> float:
    number = _require_real(name, value)
    if not low <= number <= high:
        raise SettingError(name, f"{name} must be between {low:g} and {high:g} (got {value!r})")
    return number


def _require_at_least(name: str, value: object, minimum: float) -> float:
    number = _require_real(name, value)
    if number < minimum:
        raise SettingError(name, f"{name} must be at least {minimum:g} (got {value!r})")
    return number


def _require_int(name: str, value: object, minimum: int) -> int:
    """Accept integral numbers, including floats like 40.0 that JSON clients send."""
    if isinstance(value, bool):
        raise SettingError(name, f"{name} must be an integer (got {value!r})")
    if isinstance(value, Integral):
        number = int(value)
    elif isinstance(value, Real) and float(value).is_integer():
        number = int(value)
    else:
        raise SettingError(name, f"{name} must be an integer (got {value!r})")
    if number < minimum:
        raise SettingError(name, f"{name} must be at least {minimum} (got {value!r})")
    return number


#: Larger ids than any vocabulary has; an id past it is stored as this (it then matches no
#: token, as any id beyond the vocabulary does) instead of overflowing int64.
_NO_TOKEN = 2**62


def _token_id_array(name: str, token_ids: Iterable[object]) -> np.ndarray:
    """Token ids as int64; decimal strings pass too, since JSON object keys are strings."""
    ids = [
        min(_require_int(name, int(token_id) if _is_decimal(token_id) else token_id, 0), _NO_TOKEN)
        for token_id in token_ids
    ]
    return np.asarray(ids, dtype=np.int64)


def _is_decimal(value: object) -> bool:
    return isinstance(value, str) and value.strip().isdecimal()


def _mirostat_mode(value: object) -> int:
    mode = _require_int("mirostat", value, 0)
    if mode > 2:
        raise SettingError("mirostat", f"mirostat must be 0 (off), 1 or 2 (got {value!r})")
    return mode


def _string_list(name: str, value: object) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise SettingError(name, f"{name} must be a list of strings")
    if not all(isinstance(item, str) for item in value):
        raise SettingError(name, f"{name} must be a list of strings (got {value!r})")
    return list(value)


def _request_rng(seed: object) -> np.random.Generator:
    """The request's generator: seeded when ``seed >= 0``, else from OS entropy."""
    if seed is not None:
        seed = _require_int("seed", seed, -(2**63))
    return np.random.default_rng(seed if seed is not None and seed >= 0 else None)


# --------------------------------------------------------------------------
# Shared numeric helpers.
# --------------------------------------------------------------------------


def _unmasked(logits: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """Return (indices, values) of the entries that are not masked.

    ``indices`` is None when nothing is masked: then ``values`` is ``logits``
    itself, so samplers early in the chain do not pay for a gather. (A min()
    is several times cheaper than building the index list.)
    """
    if logits.size and logits.min() > NEG_INF:
        return None, logits
    indices = np.flatnonzero(logits > NEG_INF)
    return indices, logits[indices]


def _keep(logits: np.ndarray, indices: np.ndarray | None, keep: np.ndarray) -> np.ndarray:
    """Return logits with only the flagged entries (a mask over the unmasked values) left."""
    return _keep_positions(logits, indices, np.flatnonzero(keep))


def _keep_positions(
    logits: np.ndarray, indices: np.ndarray | None, positions: np.ndarray
) -> np.ndarray:
    """Return logits with only ``positions`` (into the unmasked values) left.

    Writing the few survivors into a fresh ``-inf`` array is cheaper than a
    boolean assignment over the whole vocabulary when most tokens go.
    """
    kept = positions if indices is None else indices[positions]
    survivors = np.full_like(logits, NEG_INF)
    survivors[kept] = logits[kept]
    return survivors


# Block size for running sums over long arrays: numpy's cumsum is sequential
# and slow on a whole vocabulary, block sums are vectorised.
_CUMSUM_BLOCK = 256


def _locate_mass(weights: np.ndarray, target: float, side: str = "left") -> int:
    """Index where the running sum of ``weights`` first reaches ``target``.

    ``side="left"`` finds the first running sum ``>= target``, ``"right"`` the
    first ``> target``; the result is clamped to the last index. Long arrays
    are summed per block first, so only one block needs a running sum.
    """
    size = weights.size
    if size <= 2 * _CUMSUM_BLOCK:
        running = np.cumsum(weights, dtype=np.float64)
        return min(int(np.searchsorted(running, target, side=side)), size - 1)
    block_count = -(-size // _CUMSUM_BLOCK)
    padded = np.zeros(block_count * _CUMSUM_BLOCK, dtype=weights.dtype)
    padded[:size] = weights
    blocks = padded.reshape(block_count, _CUMSUM_BLOCK)
    block_running = np.cumsum(blocks.sum(axis=1, dtype=np.float64))
    block = min(int(np.searchsorted(block_running, target, side=side)), block_count - 1)
    before = float(block_running[block - 1]) if block else 0.0
    inner = np.cumsum(blocks[block], dtype=np.float64)
    offset = min(int(np.searchsorted(inner, target - before, side=side)), _CUMSUM_BLOCK - 1)
    return min(block * _CUMSUM_BLOCK + offset, size - 1)


def _window(context: np.ndarray, penalty_range: int) -> np.ndarray:
    """The last ``penalty_range`` context tokens (all of them when it is 0)."""
    if penalty_range > 0 and context.size > penalty_range:
        return context[-penalty_range:]
    return context


# --------------------------------------------------------------------------
# Samplers.
# --------------------------------------------------------------------------
