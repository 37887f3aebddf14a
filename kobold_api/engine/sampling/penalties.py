"""Samplers that push tokens down or out by what was written: logit bias, token bans, the
repetition penalties (KoboldAI's, OpenAI's presence/frequency) and DRY."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from .base import (
    MAX_LOGIT_BIAS, NEG_INF, SettingError, _require_at_least, _require_between, _require_int, _require_real,
    _token_id_array, _window,
)


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
