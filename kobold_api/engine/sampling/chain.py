"""The chain: ``sampler_order`` normalized, the processors composed in KoboldCpp's order, and
the draw (:class:`TokenSampler`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from .base import (
    LogitsProcessor, NEG_INF, SamplerId, SamplingParams, SettingError, _locate_mass, _mirostat_mode,
    _request_rng, _require_at_least, _require_between, _require_int, _string_list, _unmasked,
)
from .candidates import Candidates, apply_cut, cut_index, only_lowers
from .penalties import (
    DryPenaltySampler, LogitBiasSampler, PresenceFrequencyPenaltySampler, RepetitionPenaltySampler, TokenBanSampler,
)
from .temperature import DynamicTemperatureSampler, MirostatSampler, SmoothingSampler, TemperatureSampler
from .truncation import (
    AdaptivePSampler, MinPSampler, TailFreeSampler, TopASampler, TopKSampler, TopNSigmaSampler, TopPSampler,
    TypicalSampler, XTCSampler,
)


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
    if _require_at_least("nsigma", params.nsigma, 0.0) != 0:
        chain.append(TopNSigmaSampler(params.nsigma))

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
    if params.adaptive_target >= 0:
        chain.append(AdaptivePSampler(params.adaptive_target, params.adaptive_decay))
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
        self._adaptive = next((p for p in self._processors if isinstance(p, AdaptivePSampler)), None)
        self._greedy_lowers = all(only_lowers(processor) for processor in self._greedy_processors)
        self._cuts: dict[tuple[int, bool], int | None] = {}  # the chain is fixed: found once per K

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
        return self._finish(scores)

    def claims_top(self, k: int, with_mass: bool = False) -> bool:
        """Whether :meth:`sample_top` can serve this request from ``k`` candidates per step
        (``with_mass``: and the row's log-sum-exp); it may still answer None on a step where
        they do not settle the token."""
        return self._greedy_lowers if self._greedy else self._cut(k, with_mass) is not None

    def _cut(self, k: int, with_mass: bool) -> int | None:
        if (k, with_mass) not in self._cuts:
            self._cuts[k, with_mass] = cut_index(self._processors, k, with_mass)
        return self._cuts[k, with_mass]

    def sample_top(self, candidates: Candidates, context: np.ndarray) -> int | None:
        """The token the whole row would give (same seed, same token), picked from the row's
        top ``candidates``; None when they cannot prove it: the caller samples the whole row
        then (this sampler's state is untouched). See :mod:`.candidates`."""
        token_ids = np.asarray(context, dtype=np.int64).reshape(-1)
        scores = candidates.row()
        if self._greedy:
            if not self._greedy_lowers:
                return None
            for processor in self._greedy_processors:
                scores = processor(scores, token_ids)
            choice = int(np.argmax(scores))
            return choice if scores[choice] > candidates.floor else None
        cut = self._cut(candidates.ids.size, candidates.lse is not None)
        if cut is None:
            return None
        for processor in self._processors[:cut]:
            scores = processor(scores, token_ids)
        settled = apply_cut(self._processors, cut, scores, candidates, token_ids)
        if settled is None:
            return None
        scores, taken = settled
        for processor in self._processors[cut + taken:]:
            scores = processor(scores, token_ids)
        return self._finish(scores)

    def _finish(self, scores: np.ndarray) -> int:
        choice, log_p = self._draw(scores)
        if self._mirostat is not None:
            self._mirostat.observe(log_p)
        if self._adaptive is not None:
            self._adaptive.observe(choice)
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
