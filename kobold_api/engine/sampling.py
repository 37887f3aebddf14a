"""Token samplers with KoboldAI semantics, in numpy.

The generation loop calls a :class:`TokenSampler` once per generated token.
Each sampler is a small class that validates its settings once, in
``__init__``, and then transforms a 1-D float32 logits vector on every call
(masking means setting an entry to ``-inf``). The chain is ordered by the
KoboldAI wire field ``sampler_order``, whose ids are listed in
:class:`SamplerId`.

Performance notes: a call must cost well under a millisecond for a
49,152-entry vocabulary, so the samplers avoid full-vocabulary sorts whenever
the answer provably does not depend on the tail (see :class:`TopPSampler` and
:class:`TypicalSampler`), and only look at the entries that are still
unmasked once an earlier sampler has truncated the distribution.

Ties: every truncating sampler cuts by *value*, so tokens whose score equals
the score at the cut are all kept. This makes the result independent of how a
sort orders equal entries (the reference implementations cut by position,
which is arbitrary among ties).

The chain, as :func:`build_processors` composes it (KoboldCpp's order):

1. ``logit_bias``, then the token bans;
2. with ``mirostat`` off, the ``sampler_order`` ids in turn, where id 5 is
   the temperature step (dynamic temperature when ``dynatemp_range > 0``,
   else plain temperature; then quadratic smoothing) and id 6 the penalty
   step (DRY, ``rep_pen``, presence/frequency); then XTC;
3. with ``mirostat`` 1 or 2 instead: the penalty step, plain temperature,
   smoothing, then Mirostat (top-k/top-a/top-p/min-p/tfs/typical, dynamic
   temperature and XTC are skipped, as in KoboldCpp);
4. the draw (:class:`TokenSampler`), after which Mirostat updates its state.

Greedy decoding (temperature 0) only applies the steps that can change the
argmax: bias, bans and the penalty step (DRY included). XTC, Mirostat,
dynamic temperature and smoothing do not apply then.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum
from numbers import Integral, Real
from typing import Protocol

import numpy as np

__all__ = [
    "DEFAULT_DRY_SEQUENCE_BREAKERS",
    "DEFAULT_SAMPLER_ORDER",
    "DryPenaltySampler",
    "DynamicTemperatureSampler",
    "LogitBiasSampler",
    "LogitsProcessor",
    "MinPSampler",
    "MirostatSampler",
    "PresenceFrequencyPenaltySampler",
    "RepetitionPenaltySampler",
    "SamplerId",
    "SamplingParams",
    "SmoothingSampler",
    "TailFreeSampler",
    "TemperatureSampler",
    "TokenBanSampler",
    "TokenSampler",
    "TopASampler",
    "TopKSampler",
    "TopPSampler",
    "TypicalSampler",
    "XTCSampler",
    "build_processors",
    "normalize_sampler_order",
]

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


class LogitBiasSampler:
    """Add a per-token bias (OpenAI ``logit_bias``), clamped to +/-100.

    Ids beyond the vocabulary are ignored: only the caller knows the
    vocabulary size, so range checks against it belong to the API layer.
    """

    def __init__(self, logit_bias: Mapping[int, float]) -> None:
        if not isinstance(logit_bias, Mapping):
            raise SettingError("logit_bias", "logit_bias must map token ids to biases")
        self.token_ids = _token_id_array("logit_bias", logit_bias.keys())
        biases = [_require_real("logit_bias", bias) for bias in logit_bias.values()]
        self.biases = np.clip(  # clipped before the cast to float32, which 1e308 would overflow
            np.asarray(biases, dtype=np.float64), -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS
        ).astype(np.float32)

    def __call__(self, logits: np.ndarray, context: np.ndarray) -> np.ndarray:
        in_vocab = self.token_ids < logits.size
        # Ids are unique (dict keys), so a fancy-indexed += is safe.
        logits[self.token_ids[in_vocab]] += self.biases[in_vocab]
        return logits


class TokenBanSampler:
    """Mask banned tokens (EOS ban, bad words) so they can never be drawn."""

    def __init__(self, banned_token_ids: Iterable[object]) -> None:
        self.token_ids = np.unique(_token_id_array("banned_token_ids", banned_token_ids))

    def __call__(self, logits: np.ndarray, context: np.ndarray) -> np.ndarray:
        logits[self.token_ids[self.token_ids < logits.size]] = NEG_INF
        return logits


#: Bound for a logit an extreme penalty pushed out of range: finite, and far enough below
#: float32's limit that differences of two such logits stay finite too.
_MAX_LOGIT = 1e37


class RepetitionPenaltySampler:
    """KoboldAI's advanced repetition penalty (``rep_pen``, ``_range``, ``_slope``).

    Only the last ``R = penalty_range`` context tokens count (``R = 0``: the
    whole context). A token's logit ``l`` becomes ``l / f`` when ``l > 0`` and
    ``l * f`` when ``l <= 0``, where ``f`` is the factor of its most recent
    occurrence in that window (KoboldAI gathers from the original logits and
    scatters back, so the latest occurrence's write wins; occurrences never
    compound).

    With a slope ``s > 0`` and ``R > 1`` the factor ramps over the range so
    recent tokens are penalised more. For the token ``d`` steps from the end
    of the context (``d = 0`` is the newest)::

        x = 1 - 2 d / (R - 1)                  # +1 newest ... -1 oldest in range
        y = s x / (1 + |x| (s - 1))            # sigmoid-like bend; s = 1 is linear
        f = 1 + (y + 1) / 2 * (rep_pen - 1)    # rep_pen at x=+1, 1 at x=-1

    ``s = 0`` or ``R = 0`` give the flat factor ``f = rep_pen``; ``R = 1``
    does too (KoboldAI divides by zero there; the lone token is the newest, so
    it gets the full penalty). A ``rep_pen`` below 1 rewards repetition.
    """

    def __init__(self, penalty: float, penalty_range: int = 0, slope: float = 0.0) -> None:
        self.penalty = _require_real("rep_pen", penalty)
        if not self.penalty > 0:
            raise SettingError("rep_pen", f"rep_pen must be greater than 0 (got {penalty!r})")
        self.penalty_range = _require_int("rep_pen_range", penalty_range, 0)
        self.slope = _require_at_least("rep_pen_slope", slope, 0.0)
        self.ramped = self.slope != 0.0 and self.penalty_range > 1

    def factors(self, distance_from_end: np.ndarray) -> np.ndarray:
        """Penalty factor for tokens ``distance_from_end`` steps before the newest."""
        if not self.ramped:
            return np.full(distance_from_end.shape, self.penalty, dtype=np.float32)
        x = 1.0 - 2.0 * distance_from_end / (self.penalty_range - 1)
        y = self.slope * x / (1.0 + np.abs(x) * (self.slope - 1.0))
        return (1.0 + (y + 1.0) / 2.0 * (self.penalty - 1.0)).astype(np.float32)

    def __call__(self, logits: np.ndarray, context: np.ndarray) -> np.ndarray:
        window = _window(context, self.penalty_range)
        if window.size == 0:
            return logits
        # Reversed, so return_index gives each token's most recent occurrence.
        token_ids, distance = np.unique(window[::-1], return_index=True)
        in_vocab = (token_ids >= 0) & (token_ids < logits.size)
        token_ids, distance = token_ids[in_vocab], distance[in_vocab]
        scores = logits[token_ids]
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            factor = self.factors(distance)
            penalized = np.where(scores <= 0, scores * factor, scores / factor)
        # An extreme rep_pen (1e-300 and 1e300 are valid numbers) must not leave inf or NaN for
        # the samplers after it: the few penalized logits stay finite (0 * inf is 0), and a
        # token masked before stays masked.
        penalized = np.nan_to_num(penalized, nan=0.0, posinf=_MAX_LOGIT, neginf=-_MAX_LOGIT)
        penalized[scores == NEG_INF] = NEG_INF
        logits[token_ids] = penalized
        return logits


class PresenceFrequencyPenaltySampler:
    """OpenAI presence/frequency penalties over the repetition-penalty window.

    ``l -= presence_penalty * [count > 0] + frequency_penalty * count``, where
    ``count`` is how often the token occurs in the last ``rep_pen_range``
    context tokens (0 = whole context), as KoboldCpp/llama.cpp count them.
    """

    def __init__(
        self, presence_penalty: float, frequency_penalty: float, penalty_range: int = 0
    ) -> None:
        self.presence = _require_between("presence_penalty", presence_penalty, -2.0, 2.0)
        self.frequency = _require_between("frequency_penalty", frequency_penalty, -2.0, 2.0)
        self.penalty_range = _require_int("rep_pen_range", penalty_range, 0)

    def __call__(self, logits: np.ndarray, context: np.ndarray) -> np.ndarray:
        window = _window(context, self.penalty_range)
        if window.size == 0:
            return logits
        token_ids, counts = np.unique(window, return_counts=True)
        in_vocab = (token_ids >= 0) & (token_ids < logits.size)
        token_ids, counts = token_ids[in_vocab], counts[in_vocab]
        logits[token_ids] -= (self.presence + self.frequency * counts).astype(np.float32)
        return logits


class TopKSampler:
    """Keep the ``top_k`` highest-scoring tokens (plus any tied with the k-th)."""

    def __init__(self, top_k: int) -> None:
        self.top_k = _require_int("top_k", top_k, 1)

    def __call__(self, logits: np.ndarray, context: np.ndarray) -> np.ndarray:
        indices, values = _unmasked(logits)
        if values.size <= self.top_k:
            return logits
        # np.partition is O(n); only the k-th largest value is needed.
        kth_largest = np.partition(values, values.size - self.top_k)[values.size - self.top_k]
        return _keep(logits, indices, values >= kth_largest)


class TopASampler:
    """Drop tokens with ``p < top_a * max(p)^2`` (KoboldAI's top-a).

    In logit space with ``w = exp(l - max l)`` and ``Z = sum(w)``, the test
    ``w/Z < top_a / Z^2`` becomes ``w < top_a / Z``, so no division per token.
    The most likely token (``w = 1``) always stays, so a ``top_a`` above 1,
    which the API accepts, degrades to greedy instead of masking everything.
    """

    def __init__(self, top_a: float) -> None:
        self.top_a = _require_at_least("top_a", top_a, 0.0)

    def __call__(self, logits: np.ndarray, context: np.ndarray) -> np.ndarray:
        indices, values = _unmasked(logits)
        if values.size == 0:
            return logits
        weights = np.exp(values - values.max())
        total = float(weights.sum(dtype=np.float64))
        return _keep(logits, indices, weights >= min(self.top_a / total, 1.0))


class TopPSampler:
    """Nucleus sampling: keep the smallest top set whose mass reaches ``top_p``.

    This is KoboldCpp/llama.cpp's rule (cumulative mass ``>= top_p``; e.g.
    0.8 on probabilities [0.5, 0.3, 0.15, 0.05] keeps two tokens). ``top_p =
    0`` keeps only the most likely token.

    Speed: the kept set is a prefix of the descending order, so if the tokens
    with probability ``>= 1e-5`` already carry ``top_p`` of the mass (at most
    100,000 of them can, usually a few hundred do), sorting only them gives
    exactly the same cut as a full sort, which is the fallback.
    """

    _CANDIDATE_FLOOR = 1e-5

    def __init__(self, top_p: float) -> None:
        self.top_p = _require_between("top_p", top_p, 0.0, 1.0)

    def __call__(self, logits: np.ndarray, context: np.ndarray) -> np.ndarray:
        indices, values = _unmasked(logits)
        if values.size == 0:
            return logits
        weights = np.exp(values - values.max())
        total = float(weights.sum(dtype=np.float64))
        target = self.top_p * total
        candidates = weights[weights >= self._CANDIDATE_FLOOR * total]
        if float(candidates.sum(dtype=np.float64)) < target * (1.0 - _MASS_RTOL):
            candidates = weights
        descending = np.sort(candidates)[::-1]
        cut = descending[_locate_mass(descending, target * (1.0 - _MASS_RTOL))]
        return _keep(logits, indices, weights >= cut)


class MinPSampler:
    """Drop tokens with ``p < min_p * max(p)``, i.e. ``l < max l + ln(min_p)``.

    KoboldCpp applies it right after top-p; the ratio to the top token is
    unchanged by top-p's renormalisation, so the logit test is exact.
    """

    def __init__(self, min_p: float) -> None:
        self.min_p = _require_between("min_p", min_p, 0.0, 1.0)
        self.log_min_p = math.log(self.min_p) if self.min_p > 0 else -math.inf

    def __call__(self, logits: np.ndarray, context: np.ndarray) -> np.ndarray:
        indices, values = _unmasked(logits)
        if values.size == 0:
            return logits
        return _keep(logits, indices, values >= values.max() + np.float32(self.log_min_p))


class TailFreeSampler:
    """Tail-free sampling with KoboldAI's rule.

    Sort probabilities descending, take ``d2 = |second difference|``,
    normalise it to a CDF, and keep sorted position 0 plus every position
    ``j >= 1`` whose ``CDF[j - 1] <= tfs``; the very last position is always
    dropped. Masked tokens count as probability 0 in the full-vocabulary
    reference, so two zeros are appended after the unmasked ones to get the
    same ``d2`` without touching the masked entries.
    """

    def __init__(self, tfs: float) -> None:
        self.tfs = _require_between("tfs", tfs, 0.0, 1.0)

    def __call__(self, logits: np.ndarray, context: np.ndarray) -> np.ndarray:
        indices, values = _unmasked(logits)
        if values.size == 0:
            return logits
        descending = np.sort(values)[::-1]
        # Unnormalised probabilities: the CDF below is scale-free.
        weights = np.exp(descending - descending[0])
        padding = min(2, logits.size - values.size)
        if padding:
            weights = np.concatenate((weights, np.zeros(padding, dtype=weights.dtype)))
        if weights.size < 3:
            keep = 1
        else:
            curvature = np.abs(np.diff(weights, n=2))
            total = float(curvature.sum(dtype=np.float64))
            if total > 0:
                # Positions j with CDF[j] <= tfs form a prefix; its length is
                # the index of the first CDF value above tfs.
                within = _locate_mass(curvature, self.tfs * total, side="right")
                if within == curvature.size - 1 and self.tfs >= 1.0:
                    within = curvature.size
            else:
                # Perfectly linear probabilities: KoboldAI's CDF is NaN there,
                # so only the always-dropped last position goes.
                within = curvature.size
            keep = 1 + within
        if keep >= values.size:
            return logits
        return _keep(logits, indices, values >= descending[keep - 1])


class TypicalSampler:
    """Locally typical sampling (Meister et al. 2022), with KoboldAI's cut.

    Rank tokens by ``|ln p + H|`` (distance of their surprisal from the
    entropy ``H``), then keep the closest ones until their mass reaches
    ``typical``; the token that crosses the threshold is kept.

    Speed: the kept set is a prefix of that ranking, so if the tokens within
    distance ``D`` already carry the mass (and the cut lies safely inside
    ``D``), ranking only them is exact; ``D`` grows step by step and a full
    ranking is the last resort. The selection uses float32 distances, the
    ranking float64 ones, so near-equal distances order as in float64.
    """

    _CANDIDATE_RADII = (1.0, 2.0, 4.0, 8.0, 16.0)
    # Far above float32 error on a distance, far below any radius.
    _RADIUS_MARGIN = 1e-3

    def __init__(self, typical: float) -> None:
        self.typical = _require_between("typical", typical, 0.0, 1.0)

    def __call__(self, logits: np.ndarray, context: np.ndarray) -> np.ndarray:
        indices, values = _unmasked(logits)
        if values.size == 0:
            return logits
        top = values.max()
        shifted = values - top
        weights = np.exp(shifted)
        total = float(weights.sum(dtype=np.float64))
        # ln p = shifted - ln Z and -H = sum(p ln p) = sum(w * shifted) / Z - ln Z,
        # so ln p + H = shifted - center: the ln Z terms cancel.
        center = float((weights * shifted).sum(dtype=np.float64)) / total
        center_logit = float(top) + center  # exact float64 ranking works on raw logits
        target = self.typical * total * (1.0 - _MASS_RTOL)
        coarse_distance = np.abs(shifted - np.float32(center))
        for radius in self._CANDIDATE_RADII:
            near = np.flatnonzero(coarse_distance <= radius)
            # Empty when no token lies that close (typical 0 makes the target 0, which an
            # empty set would "reach"): widen the radius.
            if near.size == 0 or float(weights[near].sum(dtype=np.float64)) < target:
                continue
            distance, cut = self._cut(values[near], weights[near], center_logit, target)
            if cut < radius - self._RADIUS_MARGIN:
                return _keep_positions(logits, indices, near[distance <= cut])
        distance, cut = self._cut(values, weights, center_logit, target)
        return _keep(logits, indices, distance <= cut)

    @staticmethod
    def _cut(
        values: np.ndarray, weights: np.ndarray, center_logit: float, target: float
    ) -> tuple[np.ndarray, float]:
        """Distances of the given tokens and the distance of the one crossing ``target``."""
        distance = np.abs(values.astype(np.float64) - center_logit)
        order = np.argsort(distance)
        crossing = _locate_mass(weights[order], target)
        return distance, float(distance[order[crossing]])


class TemperatureSampler:
    """Divide logits by ``temperature``; 0 keeps only the most likely token(s).

    Treating 0 as greedy lets OpenAI clients send ``temperature: 0`` and keeps
    the chain correct on its own; :class:`TokenSampler` short-cuts it anyway.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = _require_at_least("temperature", temperature, 0.0)

    def __call__(self, logits: np.ndarray, context: np.ndarray) -> np.ndarray:
        return _apply_temperature(logits, self.temperature)


def _apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Divide ``logits`` by ``temperature`` in place; 0, or a temperature so small that the
    division overflows float32 (a dynamic temperature can come out at 1e-300), keeps only the
    most likely token(s); one too large for float32 leaves them all equally likely."""
    with np.errstate(over="ignore"):
        scale = np.float32(temperature)
    if scale == np.inf:  # past float32 (1e39 and up): every token left is equally likely
        logits[logits > NEG_INF] = 0.0
        return logits
    if scale >= 1.0:  # cannot overflow: in place, no copy
        np.divide(logits, scale, out=logits)
        return logits
    if scale > 0.0:
        with np.errstate(over="ignore"):
            scaled = logits / scale
        if scaled.max() < np.inf:
            logits[:] = scaled
            return logits
    logits[logits < logits.max()] = NEG_INF
    return logits


class DynamicTemperatureSampler:
    """Dynamic temperature (KoboldCpp's ``dynatemp_range``/``dynatemp_exponent``).

    The temperature used is picked per step from the entropy of the current
    distribution: with ``n`` unmasked tokens, entropy ``H`` and the bounds
    ``low = max(0, temperature - range)``, ``high = temperature + range``::

        T = low + (high - low) * (H / ln n) ** exponent

    so a peaked distribution (``H`` near 0) gets ``low`` and a flat one
    (``H = ln n``) gets ``high``. ``H / ln n`` is clamped to [0, 1] against
    rounding. ``T = 0`` keeps only the most likely token(s), like
    :class:`TemperatureSampler`. With fewer than two tokens left nothing
    happens. ``n`` counts the tokens still unmasked (KoboldCpp counts its
    candidates, which it pre-trims to the top 3,000, so on an untruncated
    distribution its ``ln n`` is ``ln 3000``).
    """

    def __init__(self, temperature: float, dynatemp_range: float, exponent: float = 1.0) -> None:
        temperature = _require_at_least("temperature", temperature, 0.0)
        spread = _require_at_least("dynatemp_range", dynatemp_range, 0.0)
        self.exponent = _require_at_least("dynatemp_exponent", exponent, 0.0)
        self.low = max(0.0, temperature - spread)
        self.high = temperature + spread

    def temperature_for(self, values: np.ndarray) -> float:
        """The temperature this sampler uses for the given unmasked logits."""
        shifted = values - values.max()
        weights = np.exp(shifted)
        total = float(weights.sum(dtype=np.float64))
        # H = ln Z - sum(w * shifted) / Z, with w = exp(shifted) and Z = sum(w).
        entropy = math.log(total) - float((weights * shifted).sum(dtype=np.float64)) / total
        normalized = min(max(entropy / math.log(values.size), 0.0), 1.0)
        return self.low + (self.high - self.low) * normalized**self.exponent

    def __call__(self, logits: np.ndarray, context: np.ndarray) -> np.ndarray:
        indices, values = _unmasked(logits)
        if values.size <= 1:
            return logits
        return _apply_temperature(logits, self.temperature_for(values))


class SmoothingSampler:
    """Quadratic sampling (``smoothing_factor``, with ``smoothing_curve``).

    KoboldCpp applies it in the temperature step, after the division by the
    temperature. With ``m`` the largest logit, ``d = l - m <= 0``,
    ``f = smoothing_factor`` and ``c = smoothing_curve``::

        l' = m - k f d^2 + s f d^3,   k = (3 - c) / 2,   s = (c - 1) / 2

    (text-generation-webui's curve). ``c = 1`` is KoboldCpp's plain quadratic
    ``l' = m - f d^2``: the top token keeps its logit, the others fall by the
    square of their gap, so the order is kept and gaps above 1/f widen
    (below it they shrink: near-ties get closer). For ``1 <= c <= 3`` the map
    is monotonic; above 3 tokens just below the top can overtake it, as in
    text-generation-webui. Curves below 1 are rejected: they would lift the
    far tail above the top token. Logits that fall below the float32 range
    become ``-inf``.
    """

    def __init__(self, smoothing_factor: float, smoothing_curve: float = 1.0) -> None:
        self.factor = _require_at_least("smoothing_factor", smoothing_factor, 0.0)
        self.curve = _require_at_least("smoothing_curve", smoothing_curve, 1.0)
        self.square = self.factor * (3.0 - self.curve) / 2.0
        self.cube = self.factor * (self.curve - 1.0) / 2.0

    def __call__(self, logits: np.ndarray, context: np.ndarray) -> np.ndarray:
        indices, values = _unmasked(logits)
        if values.size <= 1:
            return logits
        top = values.max()
        # l' = m - ((k f - s f d) * d) * d, one factor at a time: d is finite,
        # so a step can overflow to +-inf but never meet 0 * inf (no NaN), and
        # a token pushed below the float32 range ends at -inf. In-place
        # float32 steps: temporaries of this size are slow to allocate.
        gap = np.subtract(values, top)
        with np.errstate(over="ignore"):
            bend = np.multiply(gap, np.float32(-self.cube))
            bend += np.float32(self.square)
            bend *= gap
            bend *= gap
            np.subtract(top, bend, out=bend)
        if indices is None:
            logits[:] = bend
        else:
            logits[indices] = bend
        return logits


class XTCSampler:
    """Exclude Top Choices (``xtc_threshold``, ``xtc_probability``).

    On each step, with probability ``xtc_probability`` (one uniform drawn
    from the request's generator, every step, so seeded runs replay), every
    token whose probability is ``>= xtc_threshold`` is removed except the
    least likely of them; if fewer than two tokens reach the threshold
    nothing happens. Ties with that least likely token stay too (cut by
    value). Probabilities are those of the distribution the chain has left.
    Removed tokens are masked (KoboldCpp subtracts 999 from their logits).
    """

    def __init__(
        self, threshold: float, probability: float, rng: np.random.Generator
    ) -> None:
        self.threshold = _require_between("xtc_threshold", threshold, 0.0, 1.0)
        self.probability = _require_between("xtc_probability", probability, 0.0, 1.0)
        self.rng = rng

    def __call__(self, logits: np.ndarray, context: np.ndarray) -> np.ndarray:
        if not self.rng.random() < self.probability:
            return logits
        indices, values = _unmasked(logits)
        if values.size < 2:
            return logits
        weights = np.exp(values - values.max())
        total = float(weights.sum(dtype=np.float64))
        above = weights >= self.threshold * total
        if np.count_nonzero(above) < 2:
            return logits
        least = values[above].min()
        removed = np.flatnonzero(above & (values > least))
        # Few tokens go, so mask them in place (ties with the least likely one stay).
        logits[removed if indices is None else indices[removed]] = NEG_INF
        return logits


class MirostatSampler:
    """Mirostat v1 and v2 (Basu et al. 2021), with state kept per request.

    ``mu`` starts at ``2 * tau``. After each draw :meth:`observe` measures the
    surprise ``S = -log2 p(token)`` under the distribution the token was drawn
    from (after truncation, renormalised) and sets ``mu -= eta * (S - tau)``,
    steering the observed surprise towards ``tau``.

    v2 keeps the tokens whose surprise ``-log2 p`` is at most ``mu`` (at least
    the most likely one). v1 estimates the Zipf exponent ``s`` from the top
    ``m = 100`` tokens, ``s = sum(t_i b_i) / sum(t_i^2)`` with
    ``t_i = ln((i + 2) / (i + 1))`` and ``b_i = ln(p_i / p_(i+1))``, then
    keeps the top ``k = (e 2^mu / (1 - N^-e))^(1 / s)`` tokens, ``e = s - 1``,
    where ``N`` is the vocabulary size (the logits' length). For ``e = 0`` the
    limit ``2^mu / ln N`` is used; a flat top (``s = 0``) keeps everything or
    only the top token depending on the sign of the numerator's log.

    An instance belongs to one request (:class:`TokenSampler` builds one per
    request), so concurrent requests never share ``mu``.
    """

    M = 100
    #: No distribution over a vocabulary needs more surprise than this (2^1000 tokens).
    MU_LIMIT = 1000.0

    def __init__(self, version: int, tau: float = 5.0, eta: float = 0.1) -> None:
        self.version = _mirostat_mode(version)
        if self.version == 0:
            raise SettingError("mirostat", "mirostat must be 1 or 2 to build a Mirostat sampler")
        self.tau = _require_at_least("mirostat_tau", tau, 0.0)
        self.eta = _require_at_least("mirostat_eta", eta, 0.0)
        self.mu = 2.0 * self.tau

    def __call__(self, logits: np.ndarray, context: np.ndarray) -> np.ndarray:
        indices, values = _unmasked(logits)
        if values.size <= 1:
            return logits
        if self.version == 2:
            top = float(values.max())
            total = float(np.exp(values - np.float32(top)).sum(dtype=np.float64))
            # -log2(w / Z) <= mu  <=>  l >= max + ln Z - mu ln 2.
            floor = min(top + math.log(total) - self.mu * math.log(2.0), top)
            return _keep(logits, indices, values >= np.float32(floor))
        k = self._top_k(values, logits.size)
        if k >= values.size:
            return logits
        kth_largest = np.partition(values, values.size - k)[values.size - k]
        return _keep(logits, indices, values >= kth_largest)

    def _top_k(self, values: np.ndarray, vocab_size: int) -> int:
        m = min(self.M, values.size)
        top = np.sort(np.partition(values, values.size - m)[values.size - m :])[::-1]
        ranks = np.arange(1, m, dtype=np.float64)
        t = np.log((ranks + 1.0) / ranks)
        b = -np.diff(top.astype(np.float64))  # ln(p_i / p_(i+1)) = l_i - l_(i+1)
        s_hat = float((t * b).sum() / (t * t).sum())
        epsilon = s_hat - 1.0
        log_n = math.log(max(vocab_size, 2))
        # e / (1 - N^-e), which tends to 1 / ln N as e -> 0.
        ratio = 1.0 / log_n if epsilon == 0.0 else epsilon / -math.expm1(-epsilon * log_n)
        numerator = math.log(ratio) + self.mu * math.log(2.0)
        if s_hat <= 0.0:
            log_k = math.inf if numerator > 0 else -math.inf
        else:
            log_k = numerator / s_hat
        if log_k >= math.log(values.size):
            return values.size
        return max(1, int(math.exp(log_k)))

    def observe(self, log_p: float) -> float:
        """Update ``mu`` from the drawn token's natural-log probability under the distribution
        it was drawn from (the draw has it at hand: no softmax here); returns the surprise (bits)."""
        surprise = -log_p / math.log(2.0)
        # Kept in [0, MU_LIMIT] bits: a huge eta must not drive mu to +-inf (then NaN).
        self.mu = min(max(self.mu - self.eta * (surprise - self.tau), 0.0), self.MU_LIMIT)
        return surprise


class DryPenaltySampler:
    """DRY, "Don't Repeat Yourself" (``dry_multiplier``, ``_base``, ``_allowed_length``...).

    Within the last ``dry_penalty_last_n`` context tokens (0 or -1: all of
    them), for each candidate token ``t`` find the longest ``n`` such that the
    last ``n`` context tokens followed by ``t`` occur earlier in that window.
    If ``n >= dry_allowed_length``, ``t``'s logit drops by
    ``multiplier * base ** (n - allowed_length)``.

    Sequence breakers: the repeated sequence (the last ``n`` tokens) may not
    contain a breaker token, so a match stops at the most recent breaker and
    a context ending in a breaker is never penalised. As in KoboldCpp and
    llama.cpp, the candidate token itself may be a breaker. Breakers are
    token ids here (see :func:`build_processors` for how strings map to ids).

    Cost bound: match lengths are counted up to ``allowed_length + 50`` (so
    the exponent is capped at 50; KoboldCpp caps it so the power stays a
    finite float), and the penalty is capped at 1e30. Only positions where
    the last token (and, for ``allowed_length >= 2``, the last two) recur are
    examined, in one vectorised gather, so a step costs well under a
    millisecond for a 1,000-token window.
    """

    MAX_EXPONENT = 50
    MAX_PENALTY = 1e30

    def __init__(
        self,
        multiplier: float,
        base: float = 1.75,
        allowed_length: int = 2,
        penalty_last_n: int = 320,
        sequence_breaker_ids: Iterable[object] = (),
    ) -> None:
        self.multiplier = _require_at_least("dry_multiplier", multiplier, 0.0)
        self.base = _require_at_least("dry_base", base, 1.0)
        self.allowed_length = _require_int("dry_allowed_length", allowed_length, 1)
        self.penalty_last_n = _require_int("dry_penalty_last_n", penalty_last_n, -1)
        self.breaker_ids = np.unique(_token_id_array("dry_sequence_breakers", sequence_breaker_ids))
        self.max_match = self.allowed_length + self.MAX_EXPONENT
        # Penalty by how far a match exceeds allowed_length (0 .. MAX_EXPONENT): a table whose
        # size does not depend on the client's allowed_length.
        with np.errstate(over="ignore"):
            penalty = self.multiplier * self.base ** np.arange(self.MAX_EXPONENT + 1, dtype=np.float64)
        self.penalty = np.minimum(penalty, self.MAX_PENALTY).astype(np.float32)

    def match_lengths(self, context: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, longest match length) of the penalised candidates, ids unique."""
        empty = np.zeros(0, dtype=np.int64)
        window = _window(context, max(self.penalty_last_n, 0)).astype(np.int64, copy=False)
        size = window.size
        # An earlier occurrence ends at i <= size - 2, so it has at most size - 1 tokens.
        limit = min(size - 1, self.max_match)
        if self.breaker_ids.size and limit > 0:
            tail = window[size - limit :]
            breaks = np.flatnonzero(np.isin(tail, self.breaker_ids))
            if breaks.size:
                limit = limit - 1 - int(breaks[-1])  # tokens after the latest breaker
        if limit < self.allowed_length:
            return empty, empty
        # Positions i whose token equals the last one (and whose previous token
        # equals the one before the last, when a match must be 2+ long).
        recur = window[:-1] == window[-1]
        if self.allowed_length >= 2:
            recur[1:] &= window[:-2] == window[-2]
            recur[0] = False
        ends = np.flatnonzero(recur)
        if ends.size == 0:
            return empty, empty
        # same[r, k]: the k-th token before end r equals the k-th before the
        # last token. A left pad of a value below every token makes positions
        # before the window mismatch. (ufunc calls, not operators, and int32
        # positions: large temporaries are slow.)
        steps = np.arange(limit, dtype=np.int32)
        suffix = window[size - 1 - steps]
        padded = np.empty(size + limit, dtype=window.dtype)
        padded[:limit] = window.min() - 1
        padded[limit:] = window
        positions = np.add(ends.astype(np.int32)[:, None], limit - steps)
        same = np.equal(padded[positions], suffix)
        # Column 0 always matches (ends were chosen so), so an argmin of 0
        # means the whole row matched.
        lengths = np.argmin(same, axis=1)
        lengths[lengths == 0] = limit
        hit = lengths >= self.allowed_length
        tokens, lengths = window[ends[hit] + 1], lengths[hit]
        if tokens.size == 0:
            return empty, empty
        # Longest match per token: sort by (token, length), keep each token's last entry.
        order = np.lexsort((lengths, tokens))
        tokens, lengths = tokens[order], lengths[order]
        last = np.ones(tokens.size, dtype=bool)
        last[:-1] = tokens[1:] != tokens[:-1]
        return tokens[last], lengths[last]

    def __call__(self, logits: np.ndarray, context: np.ndarray) -> np.ndarray:
        if context.size < 2:
            return logits
        tokens, lengths = self.match_lengths(context)
        in_vocab = (tokens >= 0) & (tokens < logits.size)
        excess = np.minimum(lengths[in_vocab] - self.allowed_length, self.MAX_EXPONENT)
        logits[tokens[in_vocab]] -= self.penalty[excess]
        return logits


# --------------------------------------------------------------------------
# Building the chain.
# --------------------------------------------------------------------------


def normalize_sampler_order(sampler_order: Sequence[object]) -> list[int]:
    """Validate ``sampler_order`` and prepend rep_pen (6) like KoboldAI does.

    Ids must be distinct and in 0..6. A shorter list that lacks 6 gets 6 in
    front (old clients sent six ids without it). Ids that stay missing are
    simply not applied, as in KoboldCpp.
    """
    if isinstance(sampler_order, (str, bytes)) or not isinstance(sampler_order, Sequence):
        raise SettingError("sampler_order", "sampler_order must be a list of sampler ids")
    order = [_require_int("sampler_order", sampler_id, 0) for sampler_id in sampler_order]
    if not order:
        raise SettingError("sampler_order", "sampler_order must not be empty")
    if len(order) < len(SamplerId) and SamplerId.REP_PEN not in order:
        order.insert(0, int(SamplerId.REP_PEN))
    if any(sampler_id >= len(SamplerId) for sampler_id in order):
        raise SettingError("sampler_order", f"sampler_order ids must be between 0 and 6 (got {order})")
    if len(set(order)) != len(order):
        raise SettingError("sampler_order", f"sampler_order must not repeat an id (got {order})")
    return order


def build_processors(
    params: SamplingParams,
    tokenize: Callable[[str], list[int]] | None = None,
    rng: np.random.Generator | None = None,
) -> list[LogitsProcessor]:
    """Turn ``params`` into the ordered chain, skipping neutral samplers.

    Bias and bans come first; then ``sampler_order`` decides the rest. min_p
    rides with top_p (id 2); dynamic temperature replaces the temperature and
    smoothing follows it (id 5); DRY, rep_pen and presence/frequency share id
    6, in that order (KoboldCpp applies DRY right after the bias, so before
    rep_pen; here it moves with id 6 instead). XTC comes after the ordered
    chain. With ``mirostat`` on, the chain is instead: bias, bans, the id-6
    penalties, plain temperature, smoothing, Mirostat; ``sampler_order`` is
    ignored then (see the module docstring). ``rep_pen`` 0 counts
    as "off" like 1, since clients send 0 for a disabled penalty and a factor
    of 0 would divide by zero.

    ``tokenize`` turns a DRY sequence breaker into token ids (it must not add
    special tokens such as BOS). Every token id in a breaker's tokenization
    is treated as a breaker on its own: a simplification of KoboldCpp, which
    matches multi-token breakers as sequences, and which also treats tokens
    that merely contain the breaker text as breakers. Without ``tokenize``,
    DRY runs with no breakers.

    ``rng`` is the request's generator, which XTC draws its per-step roll
    from; :class:`TokenSampler` passes the one it draws tokens with. Without
    it a generator is made from ``params.seed``.

    Settings of a sampler that is off are not checked, except the switches
    themselves (``mirostat``, ``dynatemp_range``, ``smoothing_factor``,
    ``xtc_probability``, ``dry_multiplier``) and the two rep_pen fields.
    """
    order = normalize_sampler_order(params.sampler_order)
    # These two are shared by two samplers; check them even if neither is built.
    _require_int("rep_pen_range", params.rep_pen_range, 0)
    _require_at_least("rep_pen_slope", params.rep_pen_slope, 0.0)
    mirostat = _mirostat_mode(params.mirostat)
    dynatemp_range = _require_at_least("dynatemp_range", params.dynatemp_range, 0.0)
    smoothing_factor = _require_at_least("smoothing_factor", params.smoothing_factor, 0.0)
    xtc_probability = _require_between("xtc_probability", params.xtc_probability, 0.0, 1.0)
    dry_multiplier = _require_at_least("dry_multiplier", params.dry_multiplier, 0.0)

    chain: list[LogitsProcessor] = []
    if params.logit_bias:
        chain.append(LogitBiasSampler(params.logit_bias))
    if params.banned_token_ids:
        chain.append(TokenBanSampler(params.banned_token_ids))

    by_id: dict[int, list[LogitsProcessor]] = {sampler_id: [] for sampler_id in SamplerId}
    if params.top_k != 0:
        by_id[SamplerId.TOP_K].append(TopKSampler(params.top_k))
    if params.top_a != 0:
        by_id[SamplerId.TOP_A].append(TopASampler(params.top_a))
    if params.top_p != 1:
        by_id[SamplerId.TOP_P].append(TopPSampler(params.top_p))
    if params.min_p != 0:
        by_id[SamplerId.TOP_P].append(MinPSampler(params.min_p))
    if params.tfs != 1:
        by_id[SamplerId.TFS].append(TailFreeSampler(params.tfs))
    if params.typical != 1:
        by_id[SamplerId.TYPICAL].append(TypicalSampler(params.typical))

    plain_temperature: list[LogitsProcessor] = []
    if params.temperature != 1:
        plain_temperature.append(TemperatureSampler(params.temperature))
    smoothing: list[LogitsProcessor] = []
    if smoothing_factor != 0:
        smoothing.append(SmoothingSampler(smoothing_factor, params.smoothing_curve))
    if dynatemp_range != 0:
        by_id[SamplerId.TEMPERATURE].append(
            DynamicTemperatureSampler(params.temperature, dynatemp_range, params.dynatemp_exponent)
        )
    else:
        by_id[SamplerId.TEMPERATURE].extend(plain_temperature)
    by_id[SamplerId.TEMPERATURE].extend(smoothing)

    if dry_multiplier != 0:
        breakers = _string_list("dry_sequence_breakers", params.dry_sequence_breakers)
        breaker_ids: list[int] = []
        if tokenize is not None:
            for breaker in breakers:
                if breaker:
                    breaker_ids.extend(tokenize(breaker))
        by_id[SamplerId.REP_PEN].append(
            DryPenaltySampler(
                dry_multiplier,
                params.dry_base,
                params.dry_allowed_length,
                params.dry_penalty_last_n,
                breaker_ids,
            )
        )
    if params.rep_pen not in (0, 1):
        by_id[SamplerId.REP_PEN].append(
            RepetitionPenaltySampler(params.rep_pen, params.rep_pen_range, params.rep_pen_slope)
        )
    if params.presence_penalty != 0 or params.frequency_penalty != 0:
        by_id[SamplerId.REP_PEN].append(
            PresenceFrequencyPenaltySampler(
                params.presence_penalty, params.frequency_penalty, params.rep_pen_range
            )
        )

    if mirostat:
        chain.extend(by_id[SamplerId.REP_PEN])
        chain.extend(plain_temperature)
        chain.extend(smoothing)
        chain.append(MirostatSampler(mirostat, params.mirostat_tau, params.mirostat_eta))
        return chain

    for sampler_id in order:
        chain.extend(by_id[sampler_id])
    if xtc_probability != 0:
        threshold = _require_between("xtc_threshold", params.xtc_threshold, 0.0, 1.0)
        # Above 0.5 at most one token can reach the threshold: XTC never acts.
        if threshold <= 0.5:
            if rng is None:
                rng = _request_rng(params.seed)
            chain.append(XTCSampler(threshold, xtc_probability, rng))
    return chain


# Processors that still matter when decoding greedily: they can change which
# token is the argmax, whereas truncation never removes the argmax. (XTC would,
# but it is a sampling device and does not apply to greedy decoding; nor do
# Mirostat, dynamic temperature and smoothing.)
_ARGMAX_CHANGING = (
    LogitBiasSampler,
    TokenBanSampler,
    DryPenaltySampler,
    RepetitionPenaltySampler,
    PresenceFrequencyPenaltySampler,
)


class TokenSampler:
    """Built once per request: validates params once, then picks one token per step.

    It owns the request's state: the random generator (token draws and XTC's
    rolls) and the Mirostat sampler's ``mu``. ``tokenize`` is passed on to
    :func:`build_processors` for the DRY sequence breakers.
    """

    def __init__(
        self, params: SamplingParams, tokenize: Callable[[str], list[int]] | None = None
    ) -> None:
        self._rng = _request_rng(params.seed)
        self._processors = tuple(build_processors(params, tokenize, self._rng))
        self._greedy = _require_at_least("temperature", params.temperature, 0.0) == 0.0
        self._greedy_processors = tuple(
            processor for processor in self._processors if isinstance(processor, _ARGMAX_CHANGING)
        )
        self._mirostat = next(
            (p for p in self._processors if isinstance(p, MirostatSampler)), None
        )

    @property
    def greedy(self) -> bool:
        """True for temperature 0: the argmax is taken, no random draw."""
        return self._greedy

    @property
    def processors(self) -> tuple[LogitsProcessor, ...]:
        """The chain applied before the draw (for introspection and tests)."""
        return self._processors

    def __call__(self, logits: np.ndarray, context: np.ndarray) -> int:
        # Own copy: the caller's logits stay untouched and the dtype is fixed.
        scores = np.array(logits, dtype=np.float32).reshape(-1)
        token_ids = np.asarray(context, dtype=np.int64).reshape(-1)
        if self._greedy:
            for processor in self._greedy_processors:
                scores = processor(scores, token_ids)
            choice = int(np.argmax(scores))
            if not scores[choice] > NEG_INF:
                raise ValueError("no token left to sample: every token is masked")
            return choice
        for processor in self._processors:
            scores = processor(scores, token_ids)
        choice, log_p = self._draw(scores)
        if self._mirostat is not None:
            self._mirostat.observe(log_p)
        return choice

    def _draw(self, scores: np.ndarray) -> tuple[int, float]:
        """Inverse-CDF draw (one uniform per step keeps seeded runs reproducible); returns the
        token and its log-probability under ``scores``."""
        indices, values = _unmasked(scores)
        if values.size == 0:
            raise ValueError("no token left to sample: every token is masked")
        top = values.max()
        weights = np.exp(values - top)
        total = float(weights.sum(dtype=np.float64))
        position = _locate_mass(weights, self._rng.random() * total, side="right")
        log_p = float(values[position]) - float(top) - math.log(total)
        return int(position if indices is None else indices[position]), log_p
