"""Sampling from a row's top candidates instead of the whole row.

On a GPU the graph can reduce each row to its K highest logits, so only K ids and scores cross
to the host per step instead of the whole vocabulary. :meth:`TokenSampler.sample_top` picks
from them only when they provably give the token the whole row gives (same seed, same
token), and answers None otherwise, so the caller samples the whole row:

* every processor before the chain's first cut (top-k, or min-p) only lowers scores: bans,
  rep_pen >= 1, non-negative presence/frequency penalties, DRY, a logit_bias of no positive
  entry. A token outside the candidates scored at most the K-th candidate's score before
  them (the *floor*), and still does after;
* the cut then keeps only candidates: the k-th highest candidate score (top-k, k <= K), or
  the min-p threshold, lies above the floor; or, for top-p, given the whole row's log-sum-exp
  (``lse``, reduced with the candidates), the cut is the same however the mass outside the
  candidates lies between none and all of its pre-penalty mass, and keeps no token at the
  floor. From there the candidate row and the whole row are the same array (everything else
  at minus infinity), so the rest of the chain and the draw give the same token from the same
  random state.

Greedy decoding needs only its argmax-changing processors to be lowering ones and the best
candidate above the floor. Anything else (typical, TFS, top-a or XTC before a cut, Mirostat,
top-n-sigma, a positive bias, a reward for repetition, grammars, guidance) is not claimed:
those requests always take the whole row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .base import _MASS_RTOL, LogitsProcessor, NEG_INF
from .penalties import (
    DryPenaltySampler, LogitBiasSampler, PresenceFrequencyPenaltySampler, RepetitionPenaltySampler, TokenBanSampler,
)
from .truncation import MinPSampler, TopKSampler, TopPSampler


@dataclass
class Candidates:
    """A row's highest scores, best first: what the graph sends back instead of the row."""

    ids: np.ndarray  # int64 [K]
    values: np.ndarray  # float32 [K]
    vocab_size: int
    #: log(sum(exp(row))) of the whole row, when the reduction gives it (top-p needs it).
    lse: float | None = None

    @classmethod
    def of(cls, logits: np.ndarray, k: int) -> Candidates:
        """The top ``k`` of a whole row (what the GPU computes; here for the CPU and tests)."""
        row = np.asarray(logits, dtype=np.float32).reshape(-1)
        ids = np.argpartition(row, row.size - k)[row.size - k:] if k < row.size else np.arange(row.size)
        ids = ids[np.argsort(-row[ids], kind="stable")]
        top = float(row.max())
        lse = top + float(np.log(np.exp(row.astype(np.float64) - top).sum()))
        return cls(ids.astype(np.int64), row[ids], row.size, lse)

    @property
    def floor(self) -> float:
        """No token outside the candidates scores above this."""
        return float(self.values[-1]) if self.ids.size < self.vocab_size else float("-inf")

    def row(self) -> np.ndarray:
        """The whole row with every other token at minus infinity."""
        scores = np.full(self.vocab_size, NEG_INF, dtype=np.float32)
        scores[self.ids] = self.values
        return scores


class RowLogits:
    """One row of a step's output: its top candidates now, the whole row only if asked for
    (on a GPU that is the copy a claimed request never pays). ``fetch`` returns every row of
    the step at once; it runs at most once for all rows of the step (``shared``)."""

    def __init__(self, row: int, candidates: Candidates, shared: _Fetched) -> None:
        self.row = row
        self.candidates = candidates
        self._shared = shared

    def full(self) -> np.ndarray:
        return self._shared.rows()[self.row]


class _Fetched:
    def __init__(self, fetch: Callable[[], np.ndarray]) -> None:
        self._fetch = fetch
        self._rows: np.ndarray | None = None

    def rows(self) -> np.ndarray:
        if self._rows is None:
            self._rows = self._fetch()
        return self._rows


def step_rows(values: np.ndarray, ids: np.ndarray, lse: np.ndarray, vocab_size: int,
              fetch: Callable[[], np.ndarray]) -> list[RowLogits]:
    """Lazy rows of a step from its [rows, K] top values and ids (best first) and each row's
    log-sum-exp."""
    shared = _Fetched(fetch)
    return [RowLogits(row, Candidates(ids[row].astype(np.int64), values[row], vocab_size, float(lse[row])), shared)
            for row in range(values.shape[0])]


def only_lowers(processor: LogitsProcessor) -> bool:
    """Whether ``processor`` can only lower scores (so no token rises past the floor)."""
    if isinstance(processor, (TokenBanSampler, DryPenaltySampler)):
        return True
    if isinstance(processor, RepetitionPenaltySampler):
        return processor.penalty >= 1
    if isinstance(processor, PresenceFrequencyPenaltySampler):
        return processor.presence >= 0 and processor.frequency >= 0
    if isinstance(processor, LogitBiasSampler):
        return bool((processor.biases <= 0).all())
    return False


def cut_index(processors: tuple[LogitsProcessor, ...], k: int, with_mass: bool = False) -> int | None:
    """Where the chain first cuts to candidates it can prove (top-k of at most ``k``, min-p, or
    with the row's log-sum-exp top-p), with only lowering processors before it; None when the
    chain has no such cut."""
    for index, processor in enumerate(processors):
        if isinstance(processor, TopKSampler) and processor.top_k <= k or isinstance(processor, MinPSampler) \
                or with_mass and isinstance(processor, TopPSampler):
            return index
        if not only_lowers(processor):
            return None
    return None


def apply_cut(processors: tuple[LogitsProcessor, ...], cut: int, scores: np.ndarray, candidates: Candidates,
              context: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The row after the cut at ``processors[cut]``, given the candidates' ``scores`` after the
    lowering processors, and how many processors that took (a top-p followed by a min-p are
    settled together), when it provably keeps no token outside the candidates; else None."""
    processor = processors[cut]
    values = scores[candidates.ids]
    floor = candidates.floor
    if isinstance(processor, TopKSampler):
        if processor.top_k > values.size:
            return None
        kth = np.partition(values, values.size - processor.top_k)[values.size - processor.top_k]
        return (processor(scores, context), 1) if kth > floor else None
    if isinstance(processor, MinPSampler):
        threshold = values.max() + np.float32(processor.log_min_p)
        return (processor(scores, context), 1) if threshold > floor else None
    assert isinstance(processor, TopPSampler)
    following = processors[cut + 1] if cut + 1 < len(processors) else None
    min_p = following if isinstance(following, MinPSampler) else None
    keep = _top_p_keep(processor.top_p, values, candidates, min_p)
    if keep is None:
        return None
    survivors = np.full_like(scores, NEG_INF)
    survivors[candidates.ids[keep]] = values[keep]
    return survivors, 2 if min_p is not None else 1


#: Slack on the bounds of the mass outside the candidates (the log-sum-exp is float32 on a GPU).
_MASS_SLACK = 1e-3


def _top_p_keep(top_p: float, values: np.ndarray, candidates: Candidates,
                min_p: MinPSampler | None = None) -> np.ndarray | None:
    """Which candidates top-p keeps (then ``min_p``, when it follows), as the samplers decide on
    the whole row, when that does not depend on the unknown mass outside the candidates; None
    otherwise. Both keep a prefix of the descending order, so with a min-p whose threshold lies
    above the floor, top-p's cut only matters where it falls inside min-p's prefix."""
    if candidates.lse is None or not np.isfinite(values).any():
        return None
    top = values.max()
    threshold = None if min_p is None else top + np.float32(min_p.log_min_p)
    if threshold is not None and not threshold > candidates.floor:
        return None  # min-p may keep outside tokens: nothing bounds the cut
    weights = np.exp(values - top)  # float32, as the whole-row sampler computes them
    inside = float(weights.sum(dtype=np.float64))
    raw = candidates.values.astype(np.float64)
    # Outside tokens carry at most their pre-penalty mass (penalties only lower scores).
    outside = max(0.0, float(np.exp(candidates.lse - float(top)) - np.exp(raw - float(top)).sum()))
    order = np.argsort(-weights, kind="stable")
    running = np.cumsum(weights[order], dtype=np.float64)
    # Positions past the candidates mean "top-p keeps them all and outside tokens too".
    cuts = [int(np.searchsorted(running, top_p * total * (1.0 - _MASS_RTOL), side="left"))
            for total in (inside * (1 - _MASS_SLACK), (inside + outside) * (1 + _MASS_SLACK) + 1e-12 * inside)]
    if threshold is not None:
        kept_by_min_p = int((values >= threshold).sum())
        if min(cuts) >= kept_by_min_p - 1:  # top-p keeps all that min-p keeps, wherever its cut
            return values >= threshold
    if cuts[0] != cuts[1] or cuts[0] >= running.size:
        return None
    cut = weights[order[cuts[0]]]
    if not cut > np.exp(np.float32(candidates.floor) - top):  # an outside token could tie the cut
        return None
    keep = weights >= cut
    return keep if threshold is None else keep & (values >= threshold)
