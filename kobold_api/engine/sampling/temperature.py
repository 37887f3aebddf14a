"""Samplers that reshape the distribution: temperature, dynamic temperature, quadratic
smoothing, and Mirostat (which sets its own cut from a target surprise)."""

from __future__ import annotations

import math

import numpy as np

from .base import NEG_INF, SettingError, _keep, _mirostat_mode, _require_at_least, _unmasked


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
