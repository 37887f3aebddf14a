"""Samplers that cut the candidate list: top-k, top-a, top-p, min-p, tail-free, typical and XTC."""

from __future__ import annotations

import math

import numpy as np

from .base import (
    NEG_INF, _MASS_RTOL, _keep, _keep_positions, _locate_mass, _require_at_least, _require_between,
    _require_int, _unmasked,
)


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


class TopNSigmaSampler:
    """Top-n-sigma (``nsigma``): keep the tokens whose logit is at least ``max - n * std``.

    The spread is taken over the tokens still unmasked, so the cut does not depend on the
    temperature (scaling every logit scales the mean distance and the spread alike). The most
    likely token always stays.
    """

    def __init__(self, n: float) -> None:
        self.n = _require_at_least("nsigma", n, 0.0)

    def __call__(self, logits: np.ndarray, context: np.ndarray) -> np.ndarray:
        indices, values = _unmasked(logits)
        if values.size < 2:
            return logits
        top = float(values.max())
        spread = float(values.astype(np.float64).std())
        return _keep(logits, indices, values >= top - self.n * spread)


class AdaptivePSampler:
    """Adaptive-P (``adaptive_target``, ``adaptive_decay``): prefer tokens near a target probability.

    Each token's new logit falls with its probability's distance ``d`` from the step's target
    (scaled by 1/0.2): ``5 - 10 * d^2 / (1 + d)``, quadratic near the target and linear far
    from it, so a long tail never gathers mass. The step's target moves against the recent
    average of chosen tokens' probabilities (``2 * target - average``, clamped to 0..1, the
    average decayed by ``adaptive_decay`` per token and started at the target), so a run of
    near-certain tokens makes an alternative likelier next. It runs last, on what the chain
    left; :meth:`observe` takes the chosen token after the draw.
    """

    _PEAK, _SHARPNESS, _INV_WIDTH = 5.0, 10.0, 5.0

    def __init__(self, target: float, decay: float) -> None:
        self.target = _require_between("adaptive_target", target, 0.0, 1.0)
        self.decay = _require_between("adaptive_decay", decay, 0.0, 0.99)
        self._weighted = self.target / (1.0 - self.decay)
        self._total = 1.0 / (1.0 - self.decay)
        self._last: tuple[np.ndarray | None, np.ndarray] | None = None

    def __call__(self, logits: np.ndarray, context: np.ndarray) -> np.ndarray:
        indices, values = _unmasked(logits)
        if values.size < 2:
            self._last = None
            return logits
        weights = np.exp(values.astype(np.float64) - values.max())
        probs = weights / weights.sum()
        self._last = (indices, probs)
        aim = min(1.0, max(0.0, 2.0 * self.target - self._weighted / self._total))
        distance = np.abs(probs - aim) * self._INV_WIDTH
        shaped = (self._PEAK - self._SHARPNESS * distance * distance / (1.0 + distance)).astype(np.float32)
        if indices is None:
            return shaped
        result = np.full_like(logits, NEG_INF)
        result[indices] = shaped
        return result

    def observe(self, token: int) -> None:
        """Fold the chosen token's probability (before the reshaping) into the running average."""
        if self._last is None:
            return
        indices, probs = self._last
        found = np.array([token]) if indices is None else np.flatnonzero(indices == token)
        if not found.size:
            return
        probability = float(probs[found[0]])
        self._weighted = probability + self.decay * self._weighted
        self._total = 1.0 + self.decay * self._total
