"""Tests for kobold_api.engine.sampling: hand-computed cases plus reference checks.

The reference implementations below follow KoboldAI's positional rules on the
full vocabulary with a full sort, so they double as proofs that the fast paths
(candidate prefixes, blocked running sums, masked-entry skipping) give the
same kept sets.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kobold_api.engine.sampling import base as sampling
from kobold_api.engine.sampling import (
    AdaptivePSampler,
    DryPenaltySampler,
    DynamicTemperatureSampler,
    LogitBiasSampler,
    MinPSampler,
    MirostatSampler,
    PresenceFrequencyPenaltySampler,
    RepetitionPenaltySampler,
    SamplingParams,
    SmoothingSampler,
    TailFreeSampler,
    TemperatureSampler,
    TokenBanSampler,
    TokenSampler,
    TopASampler,
    TopKSampler,
    TopNSigmaSampler,
    TopPSampler,
    TypicalSampler,
    XTCSampler,
    build_processors,
    normalize_sampler_order,
)

NO_CONTEXT = np.zeros(0, dtype=np.int64)
NEUTRAL = dict(temperature=1.0, top_p=1.0, rep_pen=1.0)


def logits_of(probs: list[float]) -> np.ndarray:
    """Logits whose softmax is ``probs`` (float32, like the model's output)."""
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


def kept(logits: np.ndarray) -> set[int]:
    return {int(i) for i in np.flatnonzero(np.isfinite(logits))}


def softmax64(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - np.max(logits)
    weights = np.exp(shifted)
    return weights / weights.sum()


def apply_chain(params: SamplingParams, logits: np.ndarray, context=NO_CONTEXT) -> np.ndarray:
    scores = logits.copy()
    for processor in build_processors(params):
        scores = processor(scores, context)
    return scores


# --------------------------------------------------------------------------
# Reference implementations (slow, positional, full sort, float64).
# --------------------------------------------------------------------------


def reference_top_p(logits: np.ndarray, top_p: float) -> set[int]:
    probs = softmax64(logits)
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    # Same float slack as the sampler, so a mass that reaches top_p up to rounding counts.
    crossing = int(np.searchsorted(cumulative, top_p * (1 - sampling._MASS_RTOL), side="left"))
    return {int(i) for i in order[: crossing + 1]} & kept(logits)


def reference_tfs(logits: np.ndarray, tfs: float) -> set[int]:
    probs = softmax64(logits)
    order = np.argsort(-probs, kind="stable")
    d2 = np.abs(np.diff(probs[order], n=2))
    cdf = np.cumsum(d2 / d2.sum())
    remove = np.concatenate(([False], cdf > tfs, [True]))
    return {int(i) for i in order[~remove]} & kept(logits)


def reference_typical(logits: np.ndarray, typical: float) -> set[int]:
    probs = softmax64(logits)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_probs = np.log(probs)
        neg_entropy = np.nansum(probs * log_probs)
    deviation = np.abs(neg_entropy - log_probs)
    order = np.argsort(deviation, kind="stable")
    remove = np.roll(np.cumsum(probs[order]) >= typical * (1 - sampling._MASS_RTOL), 1)
    remove[0] = False
    return {int(i) for i in order[~remove]} & kept(logits)


def reference_rep_pen(
    logits: np.ndarray, context: np.ndarray, penalty: float, penalty_range: int, slope: float
) -> np.ndarray:
    """KoboldAI's forward formulation: ramp over range positions, gather, scatter in order."""
    scores = logits.astype(np.float64).copy()
    ids = context
    factors = np.full(ids.size, penalty)
    if penalty_range > 0:
        clipped = min(ids.size, penalty_range)
        ids = ids[ids.size - clipped :]
        factors = np.full(ids.size, penalty)
        if slope != 0:
            position = np.arange(penalty_range) / (penalty_range - 1) * 2.0 - 1.0
            bent = slope * position / (1 + np.abs(position) * (slope - 1))
            factors = (1 + (bent + 1) / 2 * (penalty - 1))[penalty_range - clipped :]
    gathered = scores[ids]
    updated = np.where(gathered <= 0, gathered * factors, gathered / factors)
    for token, value in zip(ids, updated):  # in order: the last occurrence wins
        scores[token] = value
    return scores


def random_logits(seed: int, size: int = 300, scale: float = 2.0, masked: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(size) * scale).astype(np.float32)
    logits[rng.integers(0, size, 5)] += np.float32(4.0)
    if masked:
        logits[rng.choice(size, masked, replace=False)] = -np.inf
    return logits


# --------------------------------------------------------------------------
# Truncating samplers on hand-computed examples.
# --------------------------------------------------------------------------


class TestTopP:
    def test_keeps_smallest_set_reaching_mass(self) -> None:
        # cumulative mass 0.5, 0.8, 0.95, 1.0: 0.8 is reached after 2 tokens.
        logits = logits_of([0.5, 0.3, 0.15, 0.05])
        assert kept(TopPSampler(0.8)(logits.copy(), NO_CONTEXT)) == {0, 1}
        # 0.81 is not reached until the third token (0.95).
        assert kept(TopPSampler(0.81)(logits.copy(), NO_CONTEXT)) == {0, 1, 2}

    def test_works_on_unsorted_vocab(self) -> None:
        # Same distribution, permuted: token 3 has 0.5, token 0 has 0.3.
        logits = logits_of([0.3, 0.05, 0.15, 0.5])
        assert kept(TopPSampler(0.8)(logits, NO_CONTEXT)) == {3, 0}

    def test_zero_keeps_only_the_top_token(self) -> None:
        logits = logits_of([0.2, 0.5, 0.3])
        assert kept(TopPSampler(0.0)(logits, NO_CONTEXT)) == {1}

    def test_kept_logits_are_unchanged(self) -> None:
        logits = logits_of([0.5, 0.3, 0.15, 0.05])
        result = TopPSampler(0.8)(logits.copy(), NO_CONTEXT)
        np.testing.assert_array_equal(result[:2], logits[:2])

    @pytest.mark.parametrize("scale", [0.2, 1.0, 3.0])
    @pytest.mark.parametrize("top_p", [0.3, 0.9, 0.99])
    def test_fast_path_matches_full_sort(self, scale: float, top_p: float) -> None:
        # Large vocab so that both the candidate prefix and the full-sort fallback run.
        for seed in range(3):
            logits = random_logits(seed, size=20_000, scale=scale, masked=500)
            result = TopPSampler(top_p)(logits.copy(), NO_CONTEXT)
            assert kept(result) == reference_top_p(logits, top_p)


class TestTopK:
    def test_keeps_k_largest(self) -> None:
        logits = np.array([1.0, 5.0, 3.0, 4.0, 2.0], dtype=np.float32)
        assert kept(TopKSampler(2)(logits, NO_CONTEXT)) == {1, 3}

    def test_ties_with_kth_are_kept(self) -> None:
        logits = np.array([1.0, 3.0, 3.0, 0.0], dtype=np.float32)
        assert kept(TopKSampler(1)(logits, NO_CONTEXT)) == {1, 2}

    def test_k_larger_than_vocab_is_a_no_op(self) -> None:
        logits = np.array([1.0, 2.0], dtype=np.float32)
        assert kept(TopKSampler(5)(logits, NO_CONTEXT)) == {0, 1}

    def test_counts_only_unmasked_tokens(self) -> None:
        logits = np.array([-np.inf, 2.0, 1.0, -np.inf, 0.5], dtype=np.float32)
        assert kept(TopKSampler(2)(logits, NO_CONTEXT)) == {1, 2}


class TestTopA:
    def test_threshold_is_top_a_times_max_prob_squared(self) -> None:
        logits = logits_of([0.6, 0.25, 0.1, 0.05])
        # 0.3 * 0.6^2 = 0.108: 0.1 and 0.05 fall below.
        assert kept(TopASampler(0.3)(logits.copy(), NO_CONTEXT)) == {0, 1}
        # 0.2 * 0.6^2 = 0.072: only 0.05 falls below.
        assert kept(TopASampler(0.2)(logits.copy(), NO_CONTEXT)) == {0, 1, 2}

    def test_one_keeps_max_only_when_it_is_not_certain(self) -> None:
        # 1.0 * 0.6^2 = 0.36 > 0.25.
        assert kept(TopASampler(1.0)(logits_of([0.6, 0.25, 0.15]), NO_CONTEXT)) == {0}


    def test_above_one_still_keeps_the_top_token(self) -> None:
        # 5 * 0.6^2 = 1.8 > every probability, yet the top token must survive.
        assert kept(TopASampler(5.0)(logits_of([0.6, 0.25, 0.15]), NO_CONTEXT)) == {0}


class TestMinP:
    def test_threshold_is_min_p_times_max_prob(self) -> None:
        logits = logits_of([0.5, 0.3, 0.15, 0.05])
        # 0.2 * 0.5 = 0.1: drops 0.05.
        assert kept(MinPSampler(0.2)(logits.copy(), NO_CONTEXT)) == {0, 1, 2}
        # 0.35 * 0.5 = 0.175: drops 0.15 and 0.05.
        assert kept(MinPSampler(0.35)(logits.copy(), NO_CONTEXT)) == {0, 1}

    def test_respects_earlier_masking(self) -> None:
        logits = logits_of([0.5, 0.3, 0.15, 0.05])
        logits[0] = -np.inf  # max is now token 1 (0.3): 0.4 * 0.3 = 0.12 keeps 0.15.
        assert kept(MinPSampler(0.4)(logits, NO_CONTEXT)) == {1, 2}


class TestTailFree:
    def test_hand_computed(self) -> None:
        # probs 0.4 0.3 0.2 0.05 0.05: second differences |0|, |0.05|, |0.15|,
        # normalised CDF 0, 0.25, 1.0. Position j>=1 stays while CDF[j-1] <= z;
        # the last position always goes.
        logits = logits_of([0.4, 0.3, 0.2, 0.05, 0.05])
        assert kept(TailFreeSampler(0.5)(logits.copy(), NO_CONTEXT)) == {0, 1, 2}
        assert kept(TailFreeSampler(0.2)(logits.copy(), NO_CONTEXT)) == {0, 1}
        assert kept(TailFreeSampler(0.99)(logits.copy(), NO_CONTEXT)) == {0, 1, 2}

    def test_linear_probs_drop_only_the_last(self) -> None:
        # d2 is all zero: KoboldAI's CDF is NaN, so only the final position goes.
        logits = logits_of([0.4, 0.3, 0.2, 0.1])
        assert kept(TailFreeSampler(0.5)(logits, NO_CONTEXT)) == {0, 1, 2}

    @pytest.mark.parametrize("tfs", [0.5, 0.9, 0.97])
    @pytest.mark.parametrize("masked", [0, 1, 150])
    def test_matches_full_vocab_reference(self, tfs: float, masked: int) -> None:
        # With masked entries the reference sees their zero probabilities; the
        # sampler only looks at unmasked ones plus two padded zeros.
        for seed in range(4):
            logits = random_logits(seed, scale=1.5, masked=masked)
            result = TailFreeSampler(tfs)(logits.copy(), NO_CONTEXT)
            assert kept(result) == reference_tfs(logits, tfs)


class TestTypical:
    def test_hand_computed(self) -> None:
        # probs 0.5 0.25 0.15 0.1: H = 1.208 nats, surprisals 0.693 1.386 1.897
        # 2.303, so |H - surprisal| = 0.515 0.178 0.689 1.095. Ranked: token 1,
        # 0, 2, 3 with cumulative mass 0.25 0.75 0.9 1.0; the crossing token stays.
        logits = logits_of([0.5, 0.25, 0.15, 0.1])
        assert kept(TypicalSampler(0.2)(logits.copy(), NO_CONTEXT)) == {1}
        assert kept(TypicalSampler(0.5)(logits.copy(), NO_CONTEXT)) == {0, 1}
        assert kept(TypicalSampler(0.8)(logits.copy(), NO_CONTEXT)) == {0, 1, 2}

    @pytest.mark.parametrize("typical", [0.2, 0.9, 0.99])
    @pytest.mark.parametrize("scale", [0.3, 1.0, 3.0])
    def test_matches_full_ranking(self, typical: float, scale: float) -> None:
        for seed in range(3):
            logits = random_logits(seed, size=5000, scale=scale, masked=100)
            result = TypicalSampler(typical)(logits.copy(), NO_CONTEXT)
            assert kept(result) == reference_typical(logits, typical)


class TestTemperature:
    def test_divides_logits(self) -> None:
        logits = np.array([1.0, 2.0, -3.0], dtype=np.float32)
        np.testing.assert_allclose(
            TemperatureSampler(0.5)(logits, NO_CONTEXT), [2.0, 4.0, -6.0]
        )

    def test_zero_keeps_only_the_argmax(self) -> None:
        logits = np.array([1.0, 3.0, 2.0], dtype=np.float32)
        assert kept(TemperatureSampler(0.0)(logits, NO_CONTEXT)) == {1}


# --------------------------------------------------------------------------
# Penalties, bias, bans.
# --------------------------------------------------------------------------


class TestRepetitionPenalty:
    def test_flat_divides_positive_and_multiplies_negative(self) -> None:
        logits = np.array([2.0, 1.0, -1.0, 0.5], dtype=np.float32)
        context = np.array([0, 2, 0], dtype=np.int64)
        result = RepetitionPenaltySampler(2.0, 0, 0.0)(logits, context)
        # token 0: 2 / 2 = 1 (once, even though it occurs twice); token 2: -1 * 2.
        np.testing.assert_allclose(result, [1.0, 1.0, -2.0, 0.5])

    def test_range_limits_the_window(self) -> None:
        logits = np.full(5, 3.0, dtype=np.float32)
        context = np.array([0, 1, 2, 3], dtype=np.int64)
        result = RepetitionPenaltySampler(1.5, 2, 0.0)(logits, context)
        # only the last two tokens (2, 3) count: 3 / 1.5 = 2.
        np.testing.assert_allclose(result, [3.0, 3.0, 2.0, 2.0, 3.0])

    def test_linear_slope(self) -> None:
        # R = 5, slope 1: for distance d from the newest token, x = 1 - 2d/4 =
        # 1, .5, 0, -.5, -1 and f = 1 + (x + 1)/2 * 0.5 = 1.5, 1.375, 1.25, 1.125, 1.
        logits = np.full(5, 3.0, dtype=np.float32)
        context = np.array([4, 3, 2, 1, 0], dtype=np.int64)  # token 0 is the newest
        result = RepetitionPenaltySampler(1.5, 5, 1.0)(logits, context)
        np.testing.assert_allclose(
            result, [3 / 1.5, 3 / 1.375, 3 / 1.25, 3 / 1.125, 3 / 1.0], rtol=1e-6
        )

    def test_steeper_slope_bends_the_ramp(self) -> None:
        # slope 2: y = 2x / (1 + |x|): x = .5 -> 2/3, x = -.5 -> -2/3, so
        # f = 1 + (y + 1)/2 * 0.5 = 1.41667 and 1.08333; the ends stay 1.5 and 1.
        logits = np.full(5, -3.0, dtype=np.float32)
        context = np.array([4, 3, 2, 1, 0], dtype=np.int64)
        result = RepetitionPenaltySampler(1.5, 5, 2.0)(logits, context)
        expected = [-3 * 1.5, -3 * (1 + 5 / 12), -3 * 1.25, -3 * (1 + 1 / 12), -3.0]
        np.testing.assert_allclose(result, expected, rtol=1e-6)

    def test_slope_zero_is_flat(self) -> None:
        logits = np.full(5, 3.0, dtype=np.float32)
        context = np.array([4, 3, 2, 1, 0], dtype=np.int64)
        result = RepetitionPenaltySampler(1.5, 5, 0.0)(logits, context)
        np.testing.assert_allclose(result, np.full(5, 2.0))

    def test_short_context_keeps_positions_relative_to_the_range_end(self) -> None:
        # Range 5 but only two tokens: the newest (8) gets 1.5, the one before 1.375.
        logits = np.full(10, 3.0, dtype=np.float32)
        result = RepetitionPenaltySampler(1.5, 5, 1.0)(logits, np.array([7, 8]))
        assert result[8] == pytest.approx(2.0)
        assert result[7] == pytest.approx(3 / 1.375)

    def test_most_recent_occurrence_decides(self) -> None:
        # token 0 at distance 3 (f 1.125) and distance 0 (f 1.5): 1.5 wins, no compounding.
        logits = np.full(5, 3.0, dtype=np.float32)
        context = np.array([0, 1, 2, 0], dtype=np.int64)
        result = RepetitionPenaltySampler(1.5, 5, 1.0)(logits, context)
        assert result[0] == pytest.approx(2.0)

    @pytest.mark.parametrize(
        "penalty_range,slope", [(0, 0.0), (64, 0.0), (64, 0.7), (64, 3.0), (5000, 1.0)]
    )
    def test_matches_koboldai_forward_formulation(self, penalty_range: int, slope: float) -> None:
        rng = np.random.default_rng(7)
        logits = (rng.standard_normal(300) * 3).astype(np.float32)
        context = rng.integers(0, 300, 400)
        result = RepetitionPenaltySampler(1.3, penalty_range, slope)(logits.copy(), context)
        expected = reference_rep_pen(logits, context, 1.3, penalty_range, slope)
        np.testing.assert_allclose(result, expected, rtol=1e-5)

    def test_below_one_rewards_repetition(self) -> None:
        logits = np.array([2.0, -2.0, 1.0], dtype=np.float32)
        result = RepetitionPenaltySampler(0.5, 0, 0.0)(logits, np.array([0, 1]))
        np.testing.assert_allclose(result, [4.0, -1.0, 1.0])

    def test_zero_means_off(self) -> None:
        # The API accepts rep_pen 0 (clients send it for "disabled").
        assert build_processors(SamplingParams(**{**NEUTRAL, "rep_pen": 0.0})) == []
        with pytest.raises(ValueError, match="rep_pen"):
            RepetitionPenaltySampler(0.0)

    def test_ignores_ids_outside_the_vocab(self) -> None:
        logits = np.array([2.0, 2.0], dtype=np.float32)
        result = RepetitionPenaltySampler(2.0, 0, 0.0)(logits, np.array([1, 5, -1]))
        np.testing.assert_allclose(result, [2.0, 1.0])


class TestPresenceFrequency:
    def test_openai_semantics(self) -> None:
        logits = np.zeros(4, dtype=np.float32)
        context = np.array([1, 1, 1, 2], dtype=np.int64)
        result = PresenceFrequencyPenaltySampler(0.5, 0.25, 0)(logits, context)
        # token 1: -0.5 - 3 * 0.25 = -1.25; token 2: -0.5 - 0.25 = -0.75.
        np.testing.assert_allclose(result, [0.0, -1.25, -0.75, 0.0])

    def test_counts_only_the_rep_pen_window(self) -> None:
        logits = np.zeros(4, dtype=np.float32)
        context = np.array([1, 1, 1, 2], dtype=np.int64)
        result = PresenceFrequencyPenaltySampler(0.0, 1.0, 2)(logits, context)
        np.testing.assert_allclose(result, [0.0, -1.0, -1.0, 0.0])


class TestBiasAndBans:
    def test_bias_is_added_and_clamped(self) -> None:
        logits = np.zeros(5, dtype=np.float32)
        result = LogitBiasSampler({1: 5.0, 2: 500.0, 3: -1000})(logits, NO_CONTEXT)
        np.testing.assert_allclose(result, [0.0, 5.0, 100.0, -100.0, 0.0])

    def test_bias_accepts_json_string_keys(self) -> None:
        # JSON object keys are strings: {"2": -5} must bias token 2.
        sampler = LogitBiasSampler({"2": -5.0})  # type: ignore[dict-item]
        result = sampler(np.zeros(3, dtype=np.float32), NO_CONTEXT)
        np.testing.assert_allclose(result, [0.0, 0.0, -5.0])

    def test_bans_mask(self) -> None:
        logits = np.zeros(4, dtype=np.float32)
        assert kept(TokenBanSampler([0, 2, 99])(logits, NO_CONTEXT)) == {1, 3}

    def test_ban_beats_bias_and_both_precede_the_chain(self) -> None:
        params = SamplingParams(
            logit_bias={2: 100.0},
            banned_token_ids=[2],
            top_k=1,
            sampler_order=[0, 1, 2, 3, 4, 5, 6],
            **NEUTRAL,
        )
        logits = np.array([0.0, 1.0, 0.5], dtype=np.float32)
        # The bias would make token 2 the top-1, but the ban masks it before top-k.
        assert kept(apply_chain(params, logits)) == {1}
        processors = build_processors(params)
        assert isinstance(processors[0], LogitBiasSampler)
        assert isinstance(processors[1], TokenBanSampler)


# --------------------------------------------------------------------------
# Building the chain.
# --------------------------------------------------------------------------


class TestBuildProcessors:
    def test_neutral_samplers_are_not_built(self) -> None:
        params = SamplingParams(
            temperature=1.0, top_k=0, top_a=0.0, top_p=1.0, tfs=1.0, typical=1.0,
            min_p=0.0, rep_pen=1.0, presence_penalty=0.0, frequency_penalty=0.0,
        )
        assert build_processors(params) == []

    def test_defaults_build_top_p_then_temperature(self) -> None:
        kinds = [type(p) for p in build_processors(SamplingParams())]
        assert kinds == [TopPSampler, TemperatureSampler]

    def test_everything_in_order(self) -> None:
        params = SamplingParams(
            temperature=0.7, top_k=40, top_a=0.1, top_p=0.9, tfs=0.95, typical=0.9,
            min_p=0.05, rep_pen=1.1, presence_penalty=0.1, frequency_penalty=0.1,
            sampler_order=[5, 4, 3, 2, 1, 0, 6], logit_bias={1: 1.0}, banned_token_ids=[2],
        )
        kinds = [type(p) for p in build_processors(params)]
        assert kinds == [
            LogitBiasSampler, TokenBanSampler, TemperatureSampler, TypicalSampler,
            TailFreeSampler, TopPSampler, MinPSampler, TopASampler, TopKSampler,
            RepetitionPenaltySampler, PresenceFrequencyPenaltySampler,
        ]

    def test_min_p_follows_top_p_even_when_top_p_is_neutral(self) -> None:
        params = SamplingParams(top_p=1.0, min_p=0.1, temperature=0.5,
                                sampler_order=[6, 0, 1, 3, 4, 5, 2])
        assert [type(p) for p in build_processors(params)] == [TemperatureSampler, MinPSampler]

    @pytest.mark.parametrize("length", range(1, 8))
    def test_one_to_seven_distinct_ids_are_accepted(self, length: int) -> None:
        # KoboldCpp's rule: 1 to 7 distinct ids in 0..6, in any order.
        order = [5, 3, 0, 6, 2, 4, 1][:length]
        normalized = normalize_sampler_order(order)
        assert normalized == (order if 6 in order else [6, *order])
        build_processors(SamplingParams(sampler_order=order))

    def test_short_order_gets_rep_pen_prepended(self) -> None:
        assert normalize_sampler_order([0, 1, 2, 3, 4, 5]) == [6, 0, 1, 2, 3, 4, 5]
        assert normalize_sampler_order([5, 6, 0]) == [5, 6, 0]

    @pytest.mark.parametrize(
        "order",
        [[], [0, 0, 1, 2, 3, 4, 5], [7, 0, 1, 2, 3, 4, 5], [-1], [0, 1.5], ["0"], "0123456",
         [0, 1, 2, 3, 4, 5, 6, 0]],
    )
    def test_invalid_order_is_rejected(self, order: object) -> None:
        with pytest.raises(ValueError, match="sampler_order"):
            build_processors(SamplingParams(sampler_order=order))  # type: ignore[arg-type]

    def test_order_changes_the_result(self) -> None:
        logits = logits_of([0.5, 0.3, 0.15, 0.05])
        top_p_first = SamplingParams(
            temperature=3.0, top_p=0.8, sampler_order=[6, 0, 1, 3, 4, 2, 5]
        )
        temperature_first = SamplingParams(
            temperature=3.0, top_p=0.8, sampler_order=[6, 0, 1, 3, 4, 5, 2]
        )
        # top-p on the raw probs keeps 2 (0.5 + 0.3 = 0.8).
        assert kept(apply_chain(top_p_first, logits)) == {0, 1}
        # T = 3 first flattens them to 0.336 0.283 0.225 0.156 (cumulative 0.336,
        # 0.619, 0.844), so top-p 0.8 keeps 3.
        assert kept(apply_chain(temperature_first, logits)) == {0, 1, 2}

    def test_missing_ids_are_skipped(self) -> None:
        params = SamplingParams(temperature=0.5, top_k=3, sampler_order=[6, 0])
        assert [type(p) for p in build_processors(params)] == [TopKSampler]


class TestValidation:
    @pytest.mark.parametrize(
        "overrides,field_name",
        [
            ({"top_p": 1.5}, "top_p must be between 0 and 1"),
            ({"top_p": float("nan")}, "top_p"),
            ({"top_k": -1}, "top_k"),
            ({"top_k": 2.5}, "top_k"),
            ({"top_k": True}, "top_k"),
            ({"top_a": -0.5}, "top_a"),
            ({"tfs": -0.1}, "tfs"),
            ({"typical": 2.0}, "typical"),
            ({"min_p": 1.01}, "min_p"),
            ({"temperature": -0.1}, "temperature"),
            ({"temperature": "hot"}, "temperature"),
            ({"rep_pen": -0.5}, "rep_pen must be greater than 0"),
            ({"rep_pen": "strong"}, "rep_pen"),
            ({"rep_pen_range": -1}, "rep_pen_range"),
            ({"rep_pen_slope": -0.5}, "rep_pen_slope"),
            ({"presence_penalty": 3.0}, "presence_penalty"),
            ({"frequency_penalty": -2.5}, "frequency_penalty"),
            ({"logit_bias": {-1: 1.0}}, "logit_bias"),
            ({"logit_bias": {1: float("inf")}}, "logit_bias"),
            ({"logit_bias": {"x": 1.0}}, "logit_bias"),
            ({"banned_token_ids": [3, -5]}, "banned_token_ids"),
            ({"seed": "abc"}, "seed"),
            ({"mirostat": 3}, "mirostat must be 0"),
            ({"mirostat": -1}, "mirostat"),
            ({"mirostat": 1.5}, "mirostat"),
            ({"mirostat": 2, "mirostat_tau": -1.0}, "mirostat_tau"),
            ({"mirostat": 1, "mirostat_eta": -0.1}, "mirostat_eta"),
            ({"dynatemp_range": -0.5}, "dynatemp_range"),
            ({"dynatemp_range": 0.5, "dynatemp_exponent": -1.0}, "dynatemp_exponent"),
            ({"smoothing_factor": -0.1}, "smoothing_factor"),
            ({"smoothing_factor": 0.3, "smoothing_curve": 0.5}, "smoothing_curve"),
            ({"xtc_probability": 1.5}, "xtc_probability"),
            ({"xtc_probability": 0.5, "xtc_threshold": -0.1}, "xtc_threshold"),
            ({"dry_multiplier": -0.8}, "dry_multiplier"),
            ({"dry_multiplier": "x"}, "dry_multiplier"),
            ({"dry_multiplier": 0.8, "dry_base": 0.5}, "dry_base"),
            ({"dry_multiplier": 0.8, "dry_allowed_length": 0}, "dry_allowed_length"),
            ({"dry_multiplier": 0.8, "dry_allowed_length": 2.5}, "dry_allowed_length"),
            ({"dry_multiplier": 0.8, "dry_penalty_last_n": -2}, "dry_penalty_last_n"),
            ({"dry_multiplier": 0.8, "dry_sequence_breakers": "\n"}, "dry_sequence_breakers"),
            ({"dry_multiplier": 0.8, "dry_sequence_breakers": ["\n", 5]}, "dry_sequence_breakers"),
        ],
    )
    def test_bad_values_name_the_field(self, overrides: dict, field_name: str) -> None:
        with pytest.raises(ValueError, match=field_name):
            TokenSampler(SamplingParams(**overrides))

    def test_settings_of_a_sampler_that_is_off_are_not_checked(self) -> None:
        # Clients send whatever their UI holds for samplers they left off.
        params = SamplingParams(
            mirostat=0, mirostat_tau=-1.0, dynatemp_range=0.0, dynatemp_exponent=-1.0,
            smoothing_factor=0.0, smoothing_curve=0.0, xtc_probability=0.0, xtc_threshold=7.0,
            dry_multiplier=0.0, dry_base=0.0, dry_allowed_length=0, dry_sequence_breakers="x",
        )
        assert [type(p) for p in TokenSampler(params).processors] == [
            TopPSampler, TemperatureSampler,
        ]

    def test_tokenizer_ids_for_breakers_are_checked(self) -> None:
        with pytest.raises(ValueError, match="dry_sequence_breakers"):
            TokenSampler(SamplingParams(dry_multiplier=0.8), tokenize=lambda text: [-1])

    def test_integral_floats_are_accepted(self) -> None:
        # JSON clients send 40.0 for integer fields.
        assert TopKSampler(40.0).top_k == 40  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# TokenSampler: drawing, seeds, greedy.
# --------------------------------------------------------------------------


class TestTokenSampler:
    def test_same_seed_same_tokens(self) -> None:
        params = SamplingParams(seed=1234, temperature=1.2, top_p=0.95)
        steps = [random_logits(seed, scale=1.0) for seed in range(40)]
        context = np.arange(10)

        def run(sampler: TokenSampler) -> list[int]:
            return [sampler(logits, context) for logits in steps]

        first = run(TokenSampler(params))
        assert first == run(TokenSampler(params))
        other = run(TokenSampler(SamplingParams(seed=99, temperature=1.2, top_p=0.95)))
        assert first != other

    @pytest.mark.parametrize("seed", [None, -1])
    def test_random_seed_values_work(self, seed: int | None) -> None:
        sampler = TokenSampler(SamplingParams(seed=seed))
        assert 0 <= sampler(random_logits(0), NO_CONTEXT) < 300

    @pytest.mark.parametrize("vocab", [4, 20_000])
    def test_draw_follows_the_distribution(self, vocab: int) -> None:
        # 20,000 entries exercise the blocked running sum; the other tokens are
        # masked by a ban so only the three probabilities below remain.
        logits = np.full(vocab, -np.inf, dtype=np.float32)
        hot = [1, vocab // 2, vocab - 1]
        logits[hot] = logits_of([0.6, 0.3, 0.1])
        sampler = TokenSampler(SamplingParams(seed=5, **NEUTRAL))
        draws = np.array([sampler(logits, NO_CONTEXT) for _ in range(6000)])
        frequencies = [np.mean(draws == token) for token in hot]
        np.testing.assert_allclose(frequencies, [0.6, 0.3, 0.1], atol=0.025)

    def test_draw_over_a_full_large_vocab(self) -> None:
        # Nothing masked: the draw walks block sums of all 20,000 weights.
        logits = np.zeros(20_000, dtype=np.float32)
        logits[12_345] = math.log(20_000)  # weight 20,000 vs 19,999 others at 1: p ~ 0.5
        sampler = TokenSampler(SamplingParams(seed=3, **NEUTRAL))
        draws = np.array([sampler(logits, NO_CONTEXT) for _ in range(4000)])
        assert np.mean(draws == 12_345) == pytest.approx(0.5, abs=0.03)
        assert len(set(draws.tolist())) > 1000

    def test_only_kept_tokens_are_drawn(self) -> None:
        sampler = TokenSampler(SamplingParams(seed=0, temperature=2.0, top_k=3))
        logits = random_logits(1)
        allowed = set(np.argsort(logits)[-3:].tolist())
        assert {sampler(logits, NO_CONTEXT) for _ in range(200)} == allowed

    def test_caller_logits_are_not_modified(self) -> None:
        logits = random_logits(2)
        original = logits.copy()
        TokenSampler(SamplingParams(seed=0, top_k=5, rep_pen=1.2, logit_bias={0: 3.0}))(
            logits, np.arange(50)
        )
        np.testing.assert_array_equal(logits, original)

    def test_accepts_lists_and_other_dtypes(self) -> None:
        sampler = TokenSampler(SamplingParams(seed=0, temperature=0.5, top_k=1))
        assert sampler([0.0, 2.0, 1.0], [1, 2]) == 1
        assert sampler(np.array([[0.0, 1.0, 3.0]], dtype=np.float16), np.array([[0]])) == 2

    def test_every_token_banned_is_an_error(self) -> None:
        sampler = TokenSampler(SamplingParams(banned_token_ids=[0, 1, 2]))
        with pytest.raises(ValueError, match="no token left"):
            sampler(np.zeros(3, dtype=np.float32), NO_CONTEXT)


class TestGreedy:
    def test_temperature_zero_is_greedy_argmax(self) -> None:
        sampler = TokenSampler(SamplingParams(temperature=0.0, top_p=0.5, top_k=3))
        assert sampler.greedy
        logits = random_logits(3)
        assert all(sampler(logits, NO_CONTEXT) == int(np.argmax(logits)) for _ in range(5))

    def test_sampling_is_not_greedy(self) -> None:
        assert not TokenSampler(SamplingParams()).greedy

    def test_penalties_bias_and_bans_still_apply(self) -> None:
        logits = np.array([3.0, 2.9, 1.0, 0.0], dtype=np.float32)
        context = np.array([0])
        greedy = dict(temperature=0.0)
        assert TokenSampler(SamplingParams(**greedy))(logits, context) == 0
        # rep_pen 1.1: 3.0 / 1.1 = 2.73 < 2.9.
        assert TokenSampler(SamplingParams(rep_pen=1.1, **greedy))(logits, context) == 1
        assert TokenSampler(SamplingParams(presence_penalty=0.2, **greedy))(logits, context) == 1
        assert TokenSampler(SamplingParams(logit_bias={2: 2.5}, **greedy))(logits, context) == 2
        assert TokenSampler(SamplingParams(banned_token_ids=[0], **greedy))(logits, context) == 1

    def test_greedy_with_every_token_banned_is_an_error(self) -> None:
        sampler = TokenSampler(SamplingParams(temperature=0.0, banned_token_ids=[0, 1]))
        with pytest.raises(ValueError, match="no token left"):
            sampler(np.zeros(2, dtype=np.float32), NO_CONTEXT)


# --------------------------------------------------------------------------
# KoboldCpp's extra samplers: DRY, Mirostat, dynamic temperature, smoothing, XTC.
# --------------------------------------------------------------------------


def char_tokenize(text: str) -> list[int]:
    """A stand-in tokenizer: one token per character, its code point."""
    return [ord(char) for char in text]


def dry_params(**overrides) -> SamplingParams:
    settings = dict(NEUTRAL, dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2,
                    dry_penalty_last_n=0)
    settings.update(overrides)
    return SamplingParams(**settings)


def apply_chain_with(
    params: SamplingParams, logits: np.ndarray, context: np.ndarray, tokenize
) -> np.ndarray:
    scores = logits.copy()
    for processor in build_processors(params, tokenize=tokenize):
        scores = processor(scores, context)
    return scores


def reference_dry_lengths(
    context: np.ndarray, allowed: int, last_n: int, breakers: set[int], cap: int
) -> dict[int, int]:
    """Scalar DRY: for each position j of the window, walk back from j - 1 and
    from the end while tokens agree (at most ``cap`` steps, never into the
    part before the latest breaker); token window[j] gets the longest walk."""
    window = [int(t) for t in (context[-last_n:] if last_n > 0 else context)]
    size = len(window)
    limit = 0  # breaker-free tokens at the end of the window
    while limit < size and window[size - 1 - limit] not in breakers:
        limit += 1
    best: dict[int, int] = {}
    for j in range(1, size):
        n = 0
        while n < min(j, limit, cap) and window[j - 1 - n] == window[size - 1 - n]:
            n += 1
        if n >= allowed and n > best.get(window[j], 0):
            best[window[j]] = n
    return best


def brute_force_dry_lengths(
    context: np.ndarray, allowed: int, breakers: set[int], cap: int, vocab: int
) -> dict[int, int]:
    """DRY by its definition: the longest breaker-free suffix that, followed by
    t, occurs as a contiguous run somewhere in the context."""
    tokens = [int(t) for t in context]
    text = "," + ",".join(map(str, tokens)) + ","
    best: dict[int, int] = {}
    for candidate in range(vocab):
        for n in range(min(cap, len(tokens) - 1), 0, -1):
            suffix = tokens[len(tokens) - n :]
            if any(t in breakers for t in suffix):
                continue
            if "," + ",".join(map(str, suffix + [candidate])) + "," in text:
                if n >= allowed:
                    best[candidate] = n
                break
    return best


def apply_reference_dry(logits: np.ndarray, lengths: dict[int, int], multiplier: float,
                        base: float, allowed: int) -> np.ndarray:
    expected = logits.astype(np.float64).copy()
    for token, n in lengths.items():
        expected[token] -= multiplier * base ** (n - allowed)
    return expected


class TestDry:
    def test_penalizes_the_token_that_continues_a_repeat(self) -> None:
        # "1 2 3" ends the context and occurred before, followed by 4: n = 3,
        # penalty 0.8 * 1.75^(3 - 2) = 1.4 on token 4 only.
        context = np.array([1, 2, 3, 4, 1, 2, 3])
        result = apply_chain(dry_params(), np.zeros(10, dtype=np.float32), context)
        expected = np.zeros(10)
        expected[4] = -1.4
        np.testing.assert_allclose(result, expected, rtol=1e-6)

    def test_match_of_exactly_allowed_length_gets_the_multiplier(self) -> None:
        # "5 6" repeats, followed by 7 before: n = 2 -> 0.8 * 1.75^0 = 0.8.
        context = np.array([5, 6, 7, 9, 5, 6])
        result = apply_chain(dry_params(), np.zeros(10, dtype=np.float32), context)
        assert result[7] == pytest.approx(-0.8)
        assert np.count_nonzero(result) == 1

    def test_shorter_match_than_allowed_is_free(self) -> None:
        # Only "6" repeats (n = 1 < 2): nothing is penalised.
        context = np.array([5, 6, 9, 4, 6])
        result = apply_chain(dry_params(), np.zeros(10, dtype=np.float32), context)
        np.testing.assert_array_equal(result, np.zeros(10))

    def test_each_token_gets_its_longest_match(self) -> None:
        # Ends "1 2 3". Earlier: "1 2 3" -> 8 (n = 3, 0.8 * 1.75 = 1.4) and
        # "2 3" -> 9 (n = 2, 0.8); also "... 9 1 2 3" has no second "1 2 3" end.
        context = np.array([1, 2, 3, 8, 2, 3, 9, 1, 2, 3])
        result = apply_chain(dry_params(), np.zeros(10, dtype=np.float32), context)
        expected = np.zeros(10)
        expected[8], expected[9] = -1.4, -0.8
        np.testing.assert_allclose(result, expected, rtol=1e-6)

    def test_exponent_grows_with_the_match(self) -> None:
        # n = 5, allowed 2, base 2, multiplier 0.5: 0.5 * 2^3 = 4.
        context = np.array([1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 5])
        params = dry_params(dry_multiplier=0.5, dry_base=2.0)
        result = apply_chain(params, np.full(10, 1.0, dtype=np.float32), context)
        assert result[6] == pytest.approx(1.0 - 4.0)
        assert np.count_nonzero(result != 1.0) == 1

    def test_breaker_stops_the_match(self) -> None:
        # Breaker ":" (token 58) in the repeated run: the suffix after it is
        # just "3", shorter than allowed, so token 4 goes free.
        colon = ord(":")
        context = np.array([1, colon, 3, 4, 1, colon, 3])
        logits = np.zeros(100, dtype=np.float32)
        params = dry_params(dry_sequence_breakers=[":"])
        np.testing.assert_array_equal(
            apply_chain_with(params, logits, context, char_tokenize), np.zeros(100)
        )
        # Without a tokenizer breakers cannot be resolved: the full match counts.
        assert apply_chain(params, logits.copy(), context)[4] == pytest.approx(-1.4)

    def test_breaker_shortens_the_match(self) -> None:
        # Breaker token 1 at the start of "1 2 3": only "2 3" counts, n = 2 -> 0.8.
        context = np.array([1, 2, 3, 4, 1, 2, 3])
        sampler = DryPenaltySampler(0.8, 1.75, 2, 0, [1])
        result = sampler(np.zeros(10, dtype=np.float32), context)
        assert result[4] == pytest.approx(-0.8)

    def test_context_ending_in_a_breaker_is_not_penalized(self) -> None:
        context = np.array([1, 2, 3, 4, 1, 2, 3])
        sampler = DryPenaltySampler(0.8, 1.75, 1, 0, [3])
        np.testing.assert_array_equal(
            sampler(np.zeros(10, dtype=np.float32), context), np.zeros(10)
        )

    def test_every_token_of_a_breaker_tokenization_is_a_breaker(self) -> None:
        processors = build_processors(
            dry_params(dry_sequence_breakers=["ab", "", "\n"]), tokenize=char_tokenize
        )
        (dry,) = processors
        assert dry.breaker_ids.tolist() == [10, 97, 98]

    @pytest.mark.parametrize("last_n,penalized", [(6, False), (0, True), (-1, True), (10, True)])
    def test_penalty_last_n_limits_the_window(self, last_n: int, penalized: bool) -> None:
        # The earlier "1 2 3 4" lies outside the last 6 tokens.
        context = np.array([1, 2, 3, 4, 9, 9, 9, 1, 2, 3])
        result = apply_chain(
            dry_params(dry_penalty_last_n=last_n), np.zeros(10, dtype=np.float32), context
        )
        assert (result[4] < 0) == penalized

    def test_match_lengths_are_capped(self) -> None:
        # 120 distinct tokens, then the same 120 again but the last: the match
        # is 119 long, counted as allowed + 50 = 52: penalty 1.75^50 * 0.8.
        run = np.arange(120)
        context = np.concatenate([run, run[:-1]])
        sampler = DryPenaltySampler(0.8, 1.75, 2, 0)
        tokens, lengths = sampler.match_lengths(context)
        assert tokens.tolist() == [119] and lengths.tolist() == [52]
        result = sampler(np.zeros(120, dtype=np.float32), context)
        assert result[119] == pytest.approx(-0.8 * 1.75**50, rel=1e-6)

    def test_huge_base_is_capped_not_infinite(self) -> None:
        run = np.arange(120)
        sampler = DryPenaltySampler(1.0, 1e6, 2, 0)
        result = sampler(np.zeros(120, dtype=np.float32), np.concatenate([run, run[:-1]]))
        assert np.isfinite(result).all() and result[119] == pytest.approx(-1e30)

    def test_ids_outside_the_vocab_are_ignored(self) -> None:
        context = np.array([1, 2, 50, 1, 2])
        result = DryPenaltySampler(0.8)(np.zeros(10, dtype=np.float32), context)
        np.testing.assert_array_equal(result, np.zeros(10))

    def test_dry_can_change_the_greedy_choice(self) -> None:
        logits = np.zeros(10, dtype=np.float32)
        logits[4], logits[5] = 1.0, 0.5
        context = np.array([1, 2, 3, 4, 1, 2, 3])
        assert TokenSampler(SamplingParams(temperature=0.0))(logits, context) == 4
        assert TokenSampler(dry_params(temperature=0.0))(logits, context) == 5

    def test_sits_first_in_the_rep_pen_step(self) -> None:
        params = dry_params(rep_pen=1.1, presence_penalty=0.1, top_k=5,
                            sampler_order=[0, 6, 1, 2, 3, 4, 5])
        assert [type(p) for p in build_processors(params)] == [
            TopKSampler, DryPenaltySampler, RepetitionPenaltySampler,
            PresenceFrequencyPenaltySampler,
        ]

    @pytest.mark.parametrize("seed", range(6))
    def test_matches_the_definition_on_small_contexts(self, seed: int) -> None:
        # A 4-token vocabulary repeats a lot; token 3 is a breaker in odd seeds.
        rng = np.random.default_rng(seed)
        context = rng.integers(0, 4, 40)
        breakers = {3} if seed % 2 else set()
        for allowed in (1, 2, 3):
            sampler = DryPenaltySampler(1.0, 1.5, allowed, 0, sorted(breakers))
            tokens, lengths = sampler.match_lengths(context)
            got = dict(zip(tokens.tolist(), lengths.tolist()))
            cap = allowed + DryPenaltySampler.MAX_EXPONENT
            assert got == brute_force_dry_lengths(context, allowed, breakers, cap, 4)
            assert got == reference_dry_lengths(context, allowed, 0, breakers, cap)

    @pytest.mark.parametrize("last_n", [0, -1, 320, 1000])
    @pytest.mark.parametrize("with_breakers", [False, True])
    def test_matches_slow_reference_on_a_long_context(
        self, last_n: int, with_breakers: bool
    ) -> None:
        # 1,000 tokens over a 49,152 vocabulary: random text from an 8-token
        # alphabet (many short chance repeats, so many candidates per step),
        # copied passages of 3 to 90 tokens (long repeats, some beyond the
        # cap), breakers "\n" and ":" (10, 58) sprinkled in (and penalised as
        # candidates, as in KoboldCpp), and a copied 60-token passage at the end.
        for seed in range(3):
            rng = np.random.default_rng(seed)
            context = rng.integers(100, 108, 1000)
            for _ in range(25):
                length = int(rng.integers(3, 90))
                source, target = rng.integers(0, 1000 - length, 2)
                context[target : target + length] = context[source : source + length].copy()
            context[rng.choice(1000, 30, replace=False)] = rng.choice([10, 58], 30)
            context[-60:] = context[800:860]  # inside even the 320-token window
            breakers = ["\n", ":"] if with_breakers else []
            params = dry_params(dry_penalty_last_n=last_n, dry_sequence_breakers=breakers)
            logits = (rng.standard_normal(49_152) * 3).astype(np.float32)
            result = apply_chain_with(params, logits, context, char_tokenize)
            lengths = reference_dry_lengths(
                context, 2, last_n, {10, 58} if with_breakers else set(),
                2 + DryPenaltySampler.MAX_EXPONENT,
            )
            assert len(lengths) >= 3  # the test context does repeat
            expected = apply_reference_dry(logits, lengths, 0.8, 1.75, 2)
            np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-5)


class TestMirostat:
    PROBS = [0.5, 0.25, 0.125, 0.0625, 0.0625]  # surprises 1, 2, 3, 4, 4 bits

    @pytest.mark.parametrize("tau,expected", [(1.6, {0, 1, 2}), (1.4, {0, 1}), (0.1, {0})])
    def test_v2_truncates_by_surprise(self, tau: float, expected: set[int]) -> None:
        # mu = 2 tau: 3.2 keeps surprises 1, 2, 3; 2.8 keeps 1, 2; 0.2 keeps
        # nothing, so the most likely token stays alone.
        sampler = MirostatSampler(2, tau=tau)
        assert kept(sampler(logits_of(self.PROBS), NO_CONTEXT)) == expected

    def test_v2_update_uses_the_renormalized_surprise(self) -> None:
        sampler = TokenSampler(SamplingParams(mirostat=2, mirostat_tau=1.6, mirostat_eta=0.1,
                                              seed=3, **NEUTRAL))
        (mirostat,) = sampler.processors
        assert mirostat.mu == pytest.approx(3.2)
        token = sampler(logits_of(self.PROBS), NO_CONTEXT)
        assert token in {0, 1, 2}
        surprise = -math.log2(self.PROBS[token] / 0.875)  # kept mass 0.875
        assert mirostat.mu == pytest.approx(3.2 - 0.1 * (surprise - 1.6), rel=1e-6)

    def test_mu_rises_after_low_surprise_and_falls_after_high(self) -> None:
        sampler = MirostatSampler(2, tau=3.0, eta=0.5)
        # One token at p = 1: surprise 0 < tau, so mu grows by eta * tau.
        assert sampler.observe(math.log(1.0)) == pytest.approx(0.0)
        assert sampler.mu == pytest.approx(6.0 + 1.5)
        # A token at p = 1/64: surprise 6 > tau, so mu falls by eta * 3.
        assert sampler.observe(math.log(1 / 64)) == pytest.approx(6.0)
        assert sampler.mu == pytest.approx(7.5 - 1.5)

    @pytest.mark.parametrize("version", [1, 2])
    def test_observed_surprise_settles_at_tau(self, version: int) -> None:
        # Zipf-like distribution over 2,000 tokens (entropy ~7 bits); target 3 bits.
        ranks = np.arange(1, 2001, dtype=np.float64)
        logits = (-1.1 * np.log(ranks)).astype(np.float32)
        sampler = TokenSampler(SamplingParams(mirostat=version, mirostat_tau=3.0,
                                              mirostat_eta=0.1, seed=11, **NEUTRAL))
        mirostat = sampler.processors[-1]
        surprises = []
        for _ in range(3000):
            before = mirostat.mu
            sampler(logits, NO_CONTEXT)
            surprises.append(3.0 - (mirostat.mu - before) / 0.1)
        assert np.mean(surprises[500:]) == pytest.approx(3.0, abs=0.15)
        assert 0 < mirostat.mu < 20  # mu itself stays bounded

    def test_v1_keeps_the_top_k_from_the_zipf_estimate(self) -> None:
        # Exact Zipf with s = 2 over N = 1000 tokens (shuffled): s_hat = 2, e = 1,
        # mu = 2 tau = 10, k = (1 * 2^10 / (1 - 1000^-1))^(1/2) = 32.016 -> 32.
        rng = np.random.default_rng(0)
        ranks = np.arange(1, 1001, dtype=np.float64)
        order = rng.permutation(1000)
        logits = np.empty(1000, dtype=np.float32)
        logits[order] = -2.0 * np.log(ranks)
        result = MirostatSampler(1, tau=5.0)(logits.copy(), NO_CONTEXT)
        assert kept(result) == set(order[:32].tolist())

    def test_v1_with_s_equal_one_uses_the_limit(self) -> None:
        # s = 1: k = 2^mu / ln N = 1024 / ln 1000 = 148.2 -> 148.
        logits = (-np.log(np.arange(1, 1001, dtype=np.float64))).astype(np.float32)
        assert len(kept(MirostatSampler(1, tau=5.0)(logits, NO_CONTEXT))) == 148

    def test_v1_update(self) -> None:
        logits = (-2.0 * np.log(np.arange(1, 1001, dtype=np.float64))).astype(np.float32)
        sampler = TokenSampler(SamplingParams(mirostat=1, mirostat_tau=5.0, mirostat_eta=0.2,
                                              seed=4, **NEUTRAL))
        token = sampler(logits, NO_CONTEXT)
        assert token < 32
        weights = 1.0 / np.arange(1, 33, dtype=np.float64) ** 2
        surprise = -math.log2(weights[token] / weights.sum())
        assert sampler.processors[-1].mu == pytest.approx(10.0 - 0.2 * (surprise - 5.0), rel=1e-5)

    def test_chain_skips_truncation_xtc_and_dynatemp(self) -> None:
        params = SamplingParams(
            mirostat=2, temperature=0.7, top_k=40, top_a=0.1, top_p=0.9, tfs=0.9, typical=0.9,
            min_p=0.05, rep_pen=1.1, dry_multiplier=0.8, smoothing_factor=0.2,
            dynatemp_range=0.3, xtc_probability=0.5, logit_bias={1: 1.0},
            sampler_order=[5, 0, 1, 2, 3, 4, 6],
        )
        assert [type(p) for p in build_processors(params)] == [
            LogitBiasSampler, DryPenaltySampler, RepetitionPenaltySampler,
            TemperatureSampler, SmoothingSampler, MirostatSampler,
        ]

    def test_state_is_per_request(self) -> None:
        params = SamplingParams(mirostat=2, seed=1, **NEUTRAL)
        first, second = TokenSampler(params), TokenSampler(params)
        first(logits_of(self.PROBS), NO_CONTEXT)
        assert first.processors[-1].mu != 10.0
        assert second.processors[-1].mu == 10.0

    def test_greedy_ignores_mirostat(self) -> None:
        sampler = TokenSampler(SamplingParams(mirostat=2, temperature=0.0))
        assert sampler(logits_of([0.2, 0.5, 0.3]), NO_CONTEXT) == 1
        assert sampler.processors[-1].mu == 10.0


class TestDynamicTemperature:
    def test_flat_distribution_gets_the_high_end(self) -> None:
        # T = 1, range 0.5: H = ln 4 = max, so T = 1.5.
        logits = np.ones(4, dtype=np.float32)
        result = DynamicTemperatureSampler(1.0, 0.5)(logits, NO_CONTEXT)
        np.testing.assert_allclose(result, np.full(4, 1 / 1.5), rtol=1e-6)

    def test_peaked_distribution_gets_the_low_end(self) -> None:
        # p ~ (1, 3e-22 ...): H ~ 0, so T = 0.5 and the logits double.
        logits = np.array([0.0, -50.0, -50.0, -50.0], dtype=np.float32)
        result = DynamicTemperatureSampler(1.0, 0.5)(logits, NO_CONTEXT)
        np.testing.assert_allclose(result, [0.0, -100.0, -100.0, -100.0], rtol=1e-6)

    def test_hand_computed_middle(self) -> None:
        # probs 0.5 0.25 0.25: H = 1.5 ln 2 = 1.03972, H / ln 3 = 0.94639,
        # ^2 = 0.89566; T = 0.5 + (1.5 - 0.5) * 0.89566 = 1.39566.
        logits = logits_of([0.5, 0.25, 0.25])
        sampler = DynamicTemperatureSampler(1.0, 0.5, exponent=2.0)
        result = sampler(logits.copy(), NO_CONTEXT)
        np.testing.assert_allclose(result, logits / 1.39566, rtol=1e-5)

    def test_masked_tokens_do_not_count(self) -> None:
        # Two live tokens with equal logits: H = ln 2 = max over n = 2 -> high.
        logits = np.array([1.0, 1.0, -np.inf, -np.inf], dtype=np.float32)
        result = DynamicTemperatureSampler(1.0, 0.5)(logits, NO_CONTEXT)
        np.testing.assert_allclose(result[:2], [1 / 1.5, 1 / 1.5], rtol=1e-6)
        assert kept(result) == {0, 1}

    def test_low_end_is_clamped_at_zero(self) -> None:
        sampler = DynamicTemperatureSampler(0.3, 0.5)
        assert (sampler.low, sampler.high) == (0.0, pytest.approx(0.8))
        # A near-certain token: T ~ 0, which keeps only the argmax.
        logits = np.array([0.0, -200.0, -200.0], dtype=np.float32)
        assert kept(sampler(logits, NO_CONTEXT)) == {0}

    def test_replaces_temperature_at_its_position(self) -> None:
        params = SamplingParams(temperature=0.8, dynatemp_range=0.3, top_k=5,
                                sampler_order=[6, 5, 0, 1, 2, 3, 4], top_p=1.0)
        assert [type(p) for p in build_processors(params)] == [
            DynamicTemperatureSampler, TopKSampler,
        ]

    def test_greedy_ignores_it(self) -> None:
        sampler = TokenSampler(SamplingParams(temperature=0.0, dynatemp_range=1.0))
        assert sampler.greedy
        assert sampler(logits_of([0.3, 0.4, 0.3]), NO_CONTEXT) == 1


class TestSmoothing:
    def test_hand_computed_quadratic(self) -> None:
        # m = 2, d = 0 -1 -2 -3: l' = 2 - d^2 = 2, 1, -2, -7.
        logits = np.array([2.0, 1.0, 0.0, -1.0], dtype=np.float32)
        result = SmoothingSampler(1.0)(logits, NO_CONTEXT)
        np.testing.assert_allclose(result, [2.0, 1.0, -2.0, -7.0])

    def test_keeps_the_argmax_and_widens_gaps(self) -> None:
        logits = random_logits(5, scale=3.0)
        result = SmoothingSampler(0.5)(logits.copy(), NO_CONTEXT)
        assert int(np.argmax(result)) == int(np.argmax(logits))
        assert result.max() == logits.max()
        # Same order; gaps to the top beyond 1 / factor = 2 widen, smaller ones shrink.
        np.testing.assert_array_equal(np.argsort(result, kind="stable"),
                                      np.argsort(logits, kind="stable"))
        gap_before = logits.max() - logits
        gap_after = result.max() - result
        wide = gap_before > 2.0
        assert np.all(gap_after[wide] > gap_before[wide])
        assert np.all(gap_after[~wide] <= gap_before[~wide] + 1e-5)

    def test_curve_adds_a_cubic_term(self) -> None:
        # c = 2: k = s = 0.5; d = -2, f = 1: l' = m - 0.5*4 + 0.5*(-8) = m - 6.
        logits = np.array([3.0, 1.0], dtype=np.float32)
        result = SmoothingSampler(1.0, smoothing_curve=2.0)(logits, NO_CONTEXT)
        np.testing.assert_allclose(result, [3.0, -3.0])

    def test_masked_stay_masked_and_far_tokens_do_not_overflow(self) -> None:
        logits = np.array([1.0, -np.inf, -1e30, 0.0], dtype=np.float32)
        result = SmoothingSampler(2.0)(logits, NO_CONTEXT)
        assert result[0] == 1.0 and result[3] == -1.0
        # -1e30 - 2 * (1e30)^2 is below the float32 range: -inf, not NaN.
        assert result[1] == -np.inf and result[2] == -np.inf and not np.isnan(result).any()

    def test_runs_after_temperature_in_its_step(self) -> None:
        # T = 0.5 first: [1, 0] -> [2, 0]; then smoothing 1: d = -2 -> 2 - 4 = -2.
        params = SamplingParams(temperature=0.5, top_p=1.0, smoothing_factor=1.0)
        assert [type(p) for p in build_processors(params)] == [
            TemperatureSampler, SmoothingSampler,
        ]
        result = apply_chain(params, np.array([1.0, 0.0], dtype=np.float32))
        np.testing.assert_allclose(result, [2.0, -2.0])

    def test_follows_dynamic_temperature(self) -> None:
        params = SamplingParams(temperature=0.5, top_p=1.0, smoothing_factor=1.0,
                                dynatemp_range=0.2)
        assert [type(p) for p in build_processors(params)] == [
            DynamicTemperatureSampler, SmoothingSampler,
        ]


class TestXTC:
    def test_removes_top_choices_but_the_least_likely_one(self) -> None:
        # threshold 0.15: 0.4, 0.3, 0.2 qualify; 0.4 and 0.3 go, 0.2 and 0.1 stay.
        logits = logits_of([0.3, 0.1, 0.4, 0.2])
        result = XTCSampler(0.15, 1.0, np.random.default_rng(0))(logits.copy(), NO_CONTEXT)
        assert kept(result) == {3, 1}
        np.testing.assert_array_equal(result[[1, 3]], logits[[1, 3]])

    def test_needs_two_tokens_above_the_threshold(self) -> None:
        logits = logits_of([0.7, 0.1, 0.1, 0.1])
        result = XTCSampler(0.15, 1.0, np.random.default_rng(0))(logits.copy(), NO_CONTEXT)
        np.testing.assert_array_equal(result, logits)

    def test_ties_with_the_least_likely_choice_stay(self) -> None:
        logits = logits_of([0.3, 0.3, 0.3, 0.1])
        result = XTCSampler(0.2, 1.0, np.random.default_rng(0))(logits.copy(), NO_CONTEXT)
        assert kept(result) == {0, 1, 2, 3}

    def test_probability_zero_never_acts(self) -> None:
        logits = logits_of([0.3, 0.1, 0.4, 0.2])
        sampler = XTCSampler(0.15, 0.0, np.random.default_rng(0))
        assert all(kept(sampler(logits.copy(), NO_CONTEXT)) == {0, 1, 2, 3} for _ in range(50))
        assert build_processors(SamplingParams(xtc_probability=0.0, **NEUTRAL)) == []

    def test_threshold_above_half_builds_nothing(self) -> None:
        assert build_processors(
            SamplingParams(xtc_probability=1.0, xtc_threshold=0.6, **NEUTRAL)
        ) == []

    def test_acts_with_the_given_probability(self) -> None:
        logits = logits_of([0.3, 0.1, 0.4, 0.2])
        sampler = XTCSampler(0.15, 0.3, np.random.default_rng(1))
        acted = [2 not in kept(sampler(logits.copy(), NO_CONTEXT)) for _ in range(4000)]
        assert np.mean(acted) == pytest.approx(0.3, abs=0.03)

    def test_seeded_runs_replay(self) -> None:
        logits = logits_of([0.3, 0.1, 0.4, 0.2])

        def run(seed: int) -> list[int]:
            sampler = TokenSampler(SamplingParams(xtc_probability=0.5, xtc_threshold=0.15,
                                                  seed=seed, **NEUTRAL))
            return [sampler(logits, NO_CONTEXT) for _ in range(200)]

        first = run(7)
        assert first == run(7)
        assert first != run(8)
        # Token 2 (p = 0.4) is excluded on about half the steps.
        assert 0.1 < np.mean(np.array(first) == 2) < 0.35

    def test_comes_after_the_ordered_chain(self) -> None:
        params = SamplingParams(xtc_probability=0.5, temperature=0.7, top_k=10, rep_pen=1.1,
                                sampler_order=[5, 0, 6, 1, 2, 3, 4], top_p=1.0)
        assert [type(p) for p in build_processors(params)] == [
            TemperatureSampler, TopKSampler, RepetitionPenaltySampler, XTCSampler,
        ]

    def test_greedy_ignores_it(self) -> None:
        sampler = TokenSampler(SamplingParams(temperature=0.0, xtc_probability=1.0,
                                              xtc_threshold=0.1))
        assert sampler(logits_of([0.3, 0.1, 0.4, 0.2]), NO_CONTEXT) == 2

    def test_uses_the_token_samplers_generator(self) -> None:
        sampler = TokenSampler(SamplingParams(xtc_probability=0.5, seed=1, **NEUTRAL))
        (xtc,) = sampler.processors
        assert xtc.rng is sampler._rng


class TestAllSamplersTogether:
    def test_full_chain_order(self) -> None:
        params = SamplingParams(
            temperature=0.7, top_k=40, top_a=0.1, top_p=0.9, tfs=0.95, typical=0.9,
            min_p=0.05, rep_pen=1.1, presence_penalty=0.1, frequency_penalty=0.1,
            dynatemp_range=0.2, smoothing_factor=0.3, xtc_probability=0.5,
            dry_multiplier=0.8, logit_bias={1: 1.0}, banned_token_ids=[2],
        )
        assert [type(p) for p in build_processors(params, tokenize=char_tokenize)] == [
            LogitBiasSampler, TokenBanSampler,
            DryPenaltySampler, RepetitionPenaltySampler, PresenceFrequencyPenaltySampler,
            TopKSampler, TopASampler, TailFreeSampler, TypicalSampler, TopPSampler, MinPSampler,
            DynamicTemperatureSampler, SmoothingSampler, XTCSampler,
        ]

    def test_seeded_full_chain_replays(self) -> None:
        params = SamplingParams(
            temperature=1.1, top_k=200, min_p=0.01, rep_pen=1.05, dynatemp_range=0.3,
            smoothing_factor=0.2, xtc_probability=0.5, xtc_threshold=0.05,
            dry_multiplier=0.8, seed=5,
        )
        steps = [random_logits(seed, size=500, scale=1.5) for seed in range(30)]

        def run() -> list[int]:
            sampler = TokenSampler(params, tokenize=char_tokenize)
            context = list(range(100, 120)) * 3
            for logits in steps:
                context.append(sampler(logits, np.array(context)))
            return context

        assert run() == run()


# --------------------------------------------------------------------------
# Internals the fast paths rely on.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [3, 4096, 4097, 50_000])
@pytest.mark.parametrize("side", ["left", "right"])
def test_locate_mass_matches_cumsum(size: int, side: str) -> None:
    rng = np.random.default_rng(size)
    weights = rng.random(size).astype(np.float32)
    running = np.cumsum(weights, dtype=np.float64)
    for fraction in (0.0, 0.1, 0.5, 0.999):
        target = float(running[-1]) * fraction
        expected = min(int(np.searchsorted(running, target, side=side)), size - 1)
        assert sampling._locate_mass(weights, target, side=side) == expected


class TestTopNSigma:
    def test_keeps_logits_within_n_standard_deviations_of_the_top(self) -> None:
        logits = np.array([10.0, 9.0, 8.0, 2.0, 1.0, 0.0], dtype=np.float32)
        spread = float(logits.astype(np.float64).std())
        kept = TopNSigmaSampler(1.0)(logits.copy(), NO_CONTEXT)
        expected = logits >= logits.max() - spread
        assert np.array_equal(np.isfinite(kept), expected)
        assert np.array_equal(kept[expected], logits[expected])

    def test_same_cut_at_any_temperature(self) -> None:
        logits = np.random.default_rng(1).standard_normal(500).astype(np.float32) * 3
        cut = np.isfinite(TopNSigmaSampler(1.5)(logits.copy(), NO_CONTEXT))
        scaled = np.isfinite(TopNSigmaSampler(1.5)(logits / np.float32(0.5), NO_CONTEXT))
        assert np.array_equal(cut, scaled)

    def test_zero_keeps_only_the_best_and_ignores_masked(self) -> None:
        logits = np.array([1.0, 3.0, -np.inf, 2.0], dtype=np.float32)
        assert np.flatnonzero(np.isfinite(TopNSigmaSampler(0.0)(logits.copy(), NO_CONTEXT))).tolist() == [1]

    def test_rejects_negative(self) -> None:
        with pytest.raises(sampling.SettingError):
            TopNSigmaSampler(-0.5)

    def test_chain_places_it_after_bans(self) -> None:
        chain = build_processors(SamplingParams(nsigma=1.0, banned_token_ids=[3]))
        assert [type(p) for p in chain][:2] == [TokenBanSampler, TopNSigmaSampler]


class TestAdaptiveP:
    def test_favours_tokens_near_the_target_probability(self) -> None:
        # p = 0.60, 0.35, 0.05: at target 0.3 the 0.35 token becomes the most likely.
        logits = np.log(np.array([0.60, 0.35, 0.05], dtype=np.float32))
        shaped = AdaptivePSampler(0.3, 0.9)(logits.copy(), NO_CONTEXT)
        assert int(np.argmax(shaped)) == 1
        # Near-certain choices move the next step's aim lower; unlikely ones move it higher.
        sampler = AdaptivePSampler(0.5, 0.5)
        sampler(np.log(np.array([0.9, 0.1], dtype=np.float32)), NO_CONTEXT)
        sampler.observe(0)
        before = AdaptivePSampler(0.5, 0.5)(np.log(np.array([0.6, 0.4], dtype=np.float32)), NO_CONTEXT)
        after = sampler(np.log(np.array([0.6, 0.4], dtype=np.float32)), NO_CONTEXT)
        assert after[1] - after[0] > before[1] - before[0]

    def test_keeps_masked_tokens_masked_and_runs_last(self) -> None:
        logits = np.array([2.0, -np.inf, 1.0, 0.5], dtype=np.float32)
        shaped = AdaptivePSampler(0.3, 0.9)(logits.copy(), NO_CONTEXT)
        assert shaped[1] == -np.inf and np.isfinite(shaped[[0, 2, 3]]).all()
        chain = build_processors(SamplingParams(adaptive_target=0.4, xtc_probability=0.5, xtc_threshold=0.1))
        assert isinstance(chain[-1], AdaptivePSampler)

    def test_seeded_draws_replay(self) -> None:
        params = SamplingParams(temperature=1.0, top_p=1.0, adaptive_target=0.3, seed=9)
        logits = np.random.default_rng(2).standard_normal(64).astype(np.float32)
        first, second = TokenSampler(params), TokenSampler(params)
        assert [first(logits, NO_CONTEXT) for _ in range(20)] == [second(logits, NO_CONTEXT) for _ in range(20)]

    @pytest.mark.parametrize("target, decay", [(1.5, 0.9), (0.5, 1.0), (0.5, -0.1)])
    def test_rejects_out_of_range(self, target: float, decay: float) -> None:
        with pytest.raises(sampling.SettingError):
            AdaptivePSampler(target, decay)
