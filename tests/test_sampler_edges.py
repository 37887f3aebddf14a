"""Every sampler at the edges of its range, on tiny vocabularies and empty contexts.

A request can reach any sampler with any value its validator lets through, on the first step
(an empty prompt leaves the context empty) and with whatever the model's logits are. The
sampler chain must then still pick a token that was not masked, never raise: a crash here is
a 500 on both generate routes (as ``{"prompt": "", "typical": 0.0}`` was).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kobold_api.engine.sampling import NEG_INF, SamplingParams, TokenSampler

#: One dict per sampler set-up: the sampler switched on, with an edge of each of its settings.
EDGES: list[dict] = [
    *({"temperature": t} for t in (0.0, 1e-9, 0.01, 1.0, 100.0, 1e300)),
    *({"top_k": k} for k in (1, 2, 10**9)),
    *({"top_a": a} for a in (1e-9, 1.0, 100.0)),
    *({"top_p": p} for p in (0.0, 1e-9, 0.5, 1.0)),
    *({"tfs": z} for z in (0.0, 1e-9, 0.5)),
    *({"typical": t} for t in (0.0, 1e-9, 0.5)),
    *({"min_p": p} for p in (1e-9, 0.5, 1.0)),
    *({"rep_pen": r, "rep_pen_range": n, "rep_pen_slope": s}
      for r, n, s in itertools.product((1e-300, 1e-9, 1.1, 100.0, 1e300), (0, 1, 40), (0.0, 1.0, 10.0))),
    {"logit_bias": {10**30: 5.0, "3": -1e308}, "banned_token_ids": [10**40]},  # ids past any vocabulary
    *({"presence_penalty": p, "frequency_penalty": f} for p, f in ((-2.0, 2.0), (2.0, -2.0), (2.0, 2.0))),
    *({"mirostat": m, "mirostat_tau": tau, "mirostat_eta": eta}
      for m, tau, eta in itertools.product((1, 2), (0.0, 10.0), (0.0, 1.0))),
    *({"dynatemp_range": r, "dynatemp_exponent": e, "temperature": t}
      for r, e, t in itertools.product((0.5, 100.0), (0.0, 1.0, 10.0), (0.01, 1.0, 1e300))),
    *({"smoothing_factor": f, "smoothing_curve": c} for f, c in itertools.product((0.01, 100.0), (1.0, 10.0))),
    *({"xtc_probability": 1.0, "xtc_threshold": t} for t in (0.0, 0.1, 0.5)),
    *({"dry_multiplier": m, "dry_base": b, "dry_allowed_length": n, "dry_penalty_last_n": last}
      for m, b, n, last in itertools.product((0.8, 100.0), (1.0, 100.0), (1, 2), (-1, 0, 1))),
    {"top_k": 1, "top_p": 0.0, "typical": 0.0, "tfs": 0.0, "min_p": 1.0, "top_a": 100.0, "temperature": 1e-9},
    # an extreme rep_pen before every truncation sampler (the fuzzer's 500: inf, then NaN in top_p)
    *({"rep_pen": r, "rep_pen_range": 0, "top_p": 0.9, "typical": 0.5, "tfs": 0.9, "min_p": 0.1,
       "sampler_order": [6, 0, 1, 2, 3, 4, 5]} for r in (1e-300, 1e300)),
]


def _logits(vocab: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "flat":
        return np.zeros(vocab, np.float32)
    if kind == "random":
        return (rng.standard_normal(vocab) * 5).astype(np.float32)
    if kind == "one and a crowd":  # no token's surprisal lies near the entropy (typical's cut)
        logits = np.zeros(vocab, np.float32)
        logits[0] = np.log(0.6 * (vocab - 1) / 0.4) if vocab > 1 else 0.0
        return logits
    if kind == "peaked":
        logits = np.full(vocab, -30.0, np.float32)
        logits[vocab // 2] = 30.0
        return logits
    logits = np.full(vocab, NEG_INF, np.float32)  # "one left": everything but one token masked
    logits[vocab - 1] = 1.0
    return logits


def _contexts(vocab: int) -> list[np.ndarray]:
    return [np.zeros(0, np.int64), np.array([vocab - 1]), np.full(40, vocab // 2),
            np.arange(60) % vocab]


@pytest.mark.parametrize("edge", EDGES, ids=lambda edge: ",".join(f"{k}={v}" for k, v in edge.items()))
def test_every_sampler_picks_an_unmasked_token_at_its_edges(edge: dict) -> None:
    rng = np.random.default_rng(0)
    base = {"temperature": 1.0, "top_p": 1.0, "seed": 7}
    for vocab, kind in itertools.product((1, 2, 5, 3000), ("flat", "random", "one and a crowd", "peaked", "one left")):
        logits = _logits(vocab, kind, rng)
        for context in _contexts(vocab):
            sampler = TokenSampler(SamplingParams(**{**base, **edge}), tokenize=lambda text: [0])
            for _ in range(3):  # Mirostat and XTC carry state from step to step
                with np.errstate(over="raise", divide="raise", invalid="raise"):  # no inf - inf, no x / 0
                    token = sampler(logits, context)
                assert 0 <= token < vocab and logits[token] > NEG_INF, (vocab, kind, context.size, token)
                context = np.append(context, token)


def test_typical_zero_keeps_the_most_typical_token() -> None:
    """typical 0 is the narrowest cut, not an error: the one token closest to the entropy."""
    logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    sampler = TokenSampler(SamplingParams(temperature=1.0, top_p=1.0, typical=0.0, seed=1))
    entropy = -sum(p * np.log(p) for p in (0.5, 0.3, 0.2))
    closest = int(np.argmin([abs(-np.log(p) - entropy) for p in (0.5, 0.3, 0.2)]))
    assert {sampler(logits, np.zeros(0, np.int64)) for _ in range(20)} == {closest}
