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

from kobold_api.engine import sampling
from kobold_api.engine.sampling import (
    LogitBiasSampler,
    MinPSampler,
    PresenceFrequencyPenaltySampler,
    RepetitionPenaltySampler,
    SamplingParams,
    TailFreeSampler,
    TemperatureSampler,
    TokenBanSampler,
    TokenSampler,
    TopASampler,
    TopKSampler,
    TopPSampler,
    TypicalSampler,
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

    def test_short_order_gets_rep_pen_prepended(self) -> None:
        assert normalize_sampler_order([0, 1, 2, 3, 4, 5]) == [6, 0, 1, 2, 3, 4, 5]
        assert normalize_sampler_order([5, 6, 0]) == [5, 6, 0]

    @pytest.mark.parametrize(
        "order",
        [[], [0, 0, 1, 2, 3, 4, 5], [7, 0, 1, 2, 3, 4, 5], [-1], [0, 1.5], ["0"], "0123456"],
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
        ],
    )
    def test_bad_values_name_the_field(self, overrides: dict, field_name: str) -> None:
        with pytest.raises(ValueError, match=field_name):
            TokenSampler(SamplingParams(**overrides))

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
