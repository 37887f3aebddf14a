"""The top-k path (what a GPU sends back instead of the whole row) picks the token the whole row
picks, for every sampler setting it claims, and falls back for every one it does not."""

from __future__ import annotations

import zlib
from dataclasses import replace

import numpy as np
import pytest

from kobold_api.engine.sampling import SamplingParams, TokenSampler
from kobold_api.engine.sampling.candidates import Candidates

pytestmark = pytest.mark.fast

VOCAB, K, STEPS = 600, 64, 60
BASE = SamplingParams(temperature=1.0, top_p=1.0, rep_pen=1.0)

CLAIMED = {
    "greedy": replace(BASE, temperature=0.0),
    "greedy, rep_pen, presence, bans": replace(BASE, temperature=0.0, rep_pen=1.3, presence_penalty=0.5,
                                              banned_token_ids=[1, 2, 3]),
    "top_k": replace(BASE, top_k=40),
    "SillyTavern-like: top_k, top_p, temperature, rep_pen": replace(BASE, top_k=40, top_p=0.9, temperature=0.8,
                                                                    rep_pen=1.1),
    "top_k, min_p, typical, tfs after the cut": replace(BASE, top_k=50, min_p=0.05, typical=0.9, tfs=0.95),
    "min_p alone": replace(BASE, min_p=0.1),
    "min_p, temperature, frequency": replace(BASE, min_p=0.2, temperature=1.5, frequency_penalty=0.3),
    "top_k, XTC, dynamic temperature": replace(BASE, top_k=30, xtc_probability=0.5, xtc_threshold=0.05,
                                               dynatemp_range=0.5),
    "top_k, DRY, negative bias": replace(BASE, top_k=20, dry_multiplier=0.8, logit_bias={5: -3.0}),
    "top_k after top_a in Kobold's order": replace(BASE, top_k=10, top_a=0.2),
    # Top-p without top-k: settled by the row's log-sum-exp, which the reduction sends along.
    "top_p alone": replace(BASE, top_p=0.9),
    "Kobold's defaults (top_p 0.92, no top_k)": SamplingParams(),
    "SillyTavern's defaults (top_p, min_p, rep_pen, temperature)": replace(
        BASE, temperature=0.7, top_p=0.9, min_p=0.05, rep_pen=1.1, rep_pen_range=1024, rep_pen_slope=0.9),
}
NOT_CLAIMED = {
    "typical": replace(BASE, typical=0.8),
    "tfs": replace(BASE, tfs=0.9),
    "top_a": replace(BASE, top_a=0.3),
    "top_k larger than K": replace(BASE, top_k=K + 1),
    "mirostat": replace(BASE, mirostat=2),
    "positive logit bias": replace(BASE, top_k=20, logit_bias={7: 2.0}),
    "rep_pen below 1": replace(BASE, top_k=20, rep_pen=0.8),
    "negative presence": replace(BASE, top_k=20, presence_penalty=-0.5),
    "top-n-sigma": replace(BASE, top_k=20, nsigma=1.0),
    "temperature before top_k": replace(BASE, top_k=20, temperature=0.7, sampler_order=[6, 5, 0, 1, 3, 4, 2]),
    "greedy with a positive bias": replace(BASE, temperature=0.0, logit_bias={9: 1.0}),
}


def _logits(rng: np.random.Generator) -> np.ndarray:
    """Rows like a model's: mostly peaked (a few strong tokens), some flat."""
    row = rng.normal(0, 1, VOCAB).astype(np.float32)
    row[rng.integers(0, VOCAB, 8)] += rng.uniform(0, 3) if rng.random() < 0.25 else rng.uniform(5, 12)
    return row


@pytest.mark.parametrize("name", list(CLAIMED))
def test_claimed_settings_pick_the_whole_rows_token(name: str) -> None:
    params = replace(CLAIMED[name], seed=1234)
    full, top = TokenSampler(params), TokenSampler(params)
    assert top.claims_top(K, with_mass=True)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    context = list(rng.integers(0, VOCAB, 30))
    served = 0
    for _ in range(STEPS):
        logits = _logits(rng)
        want = full(logits, np.asarray(context))
        got = top.sample_top(Candidates.of(logits, K), np.asarray(context))
        if got is None:  # not settled by the candidates: the whole row, through the same sampler
            got = top(logits, np.asarray(context))
        else:
            served += 1
        assert got == want
        context.append(want)
    # The candidates really served many steps (top-p alone, on these rows: 25-35 of 60; on the
    # default model with SillyTavern's samplers: 144 of 150, with top-k or min-p: all).
    assert served >= STEPS // 3, served


@pytest.mark.parametrize("name", list(NOT_CLAIMED))
def test_unclaimed_settings_always_fall_back(name: str) -> None:
    sampler = TokenSampler(replace(NOT_CLAIMED[name], seed=1))
    assert not sampler.claims_top(K)
    rng = np.random.default_rng(7)
    for _ in range(10):
        assert sampler.sample_top(Candidates.of(_logits(rng), K), np.arange(20)) is None


def test_top_p_needs_the_rows_log_sum_exp() -> None:
    """Without the whole row's mass the candidates cannot place top-p's cut: the whole row."""
    sampler = TokenSampler(replace(BASE, top_p=0.9, seed=2))
    assert sampler.claims_top(K, with_mass=True) and not sampler.claims_top(K)
    rng = np.random.default_rng(3)
    for _ in range(10):
        candidates = Candidates.of(_logits(rng), K)
        candidates.lse = None
        assert sampler.sample_top(candidates, np.arange(5)) is None


def test_top_p_falls_back_when_the_outside_mass_could_move_its_cut() -> None:
    """A flat row: the 64 candidates hold a fraction of the mass, so top-p 0.9 reaches outside."""
    logits = np.random.default_rng(4).normal(0, 0.1, VOCAB).astype(np.float32)
    sampler = TokenSampler(replace(BASE, top_p=0.9, seed=2))
    assert sampler.sample_top(Candidates.of(logits, K), np.arange(5)) is None


def test_a_floor_tie_is_not_settled_by_the_candidates() -> None:
    """A token outside the candidates tied with the last one could belong to the cut: fall back."""
    logits = np.zeros(VOCAB, dtype=np.float32)
    logits[:5] = [9, 8, 7, 6, 5]
    candidates = Candidates.of(logits, 8)  # three of the zeros, many more outside
    assert candidates.floor == 0.0
    sampler = TokenSampler(replace(BASE, top_k=8, seed=3))
    assert sampler.sample_top(candidates, np.arange(3)) is None
    assert TokenSampler(replace(BASE, top_k=5, seed=3)).sample_top(candidates, np.arange(3)) is not None
