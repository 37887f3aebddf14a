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
  the min-p threshold, lies above the floor. From there the candidate row and the whole row
  are the same array (everything else at minus infinity), so the rest of the chain and the
  draw give the same token from the same random state.

Greedy decoding needs only its argmax-changing processors to be lowering ones and the best
candidate above the floor. Anything else (top-p, typical, TFS, top-a or XTC before a cut,
Mirostat, top-n-sigma, a positive bias, a reward for repetition, grammars, guidance) is not
claimed: those requests always take the whole row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .base import LogitsProcessor, NEG_INF
from .penalties import (
    DryPenaltySampler, LogitBiasSampler, PresenceFrequencyPenaltySampler, RepetitionPenaltySampler, TokenBanSampler,
)
from .truncation import MinPSampler, TopKSampler


@dataclass
class Candidates:
    """A row's highest scores, best first: what the graph sends back instead of the row."""

    ids: np.ndarray  # int64 [K]
    values: np.ndarray  # float32 [K]
    vocab_size: int

    @classmethod
    def of(cls, logits: np.ndarray, k: int) -> Candidates:
        """The top ``k`` of a whole row (what the GPU computes; here for the CPU and tests)."""
        row = np.asarray(logits, dtype=np.float32).reshape(-1)
        ids = np.argpartition(row, row.size - k)[row.size - k:] if k < row.size else np.arange(row.size)
        ids = ids[np.argsort(-row[ids], kind="stable")]
        return cls(ids.astype(np.int64), row[ids], row.size)

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
        self.fetches = 0

    def rows(self) -> np.ndarray:
        if self._rows is None:
            self._rows = self._fetch()
            self.fetches += 1
        return self._rows


def step_rows(values: np.ndarray, ids: np.ndarray, vocab_size: int, fetch: Callable[[], np.ndarray]) -> list[RowLogits]:
    """Lazy rows of a step from its [rows, K] top values and ids (best first)."""
    shared = _Fetched(fetch)
    return [RowLogits(row, Candidates(ids[row].astype(np.int64), values[row], vocab_size), shared)
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


def cut_index(processors: tuple[LogitsProcessor, ...], k: int) -> int | None:
    """Where the chain first cuts to candidates it can prove (top-k of at most ``k``, or
    min-p), with only lowering processors before it; None when the chain has no such cut."""
    for index, processor in enumerate(processors):
        if isinstance(processor, TopKSampler) and processor.top_k <= k or isinstance(processor, MinPSampler):
            return index
        if not only_lowers(processor):
            return None
    return None


def cut_holds(processor: LogitsProcessor, scores: np.ndarray, candidates: Candidates) -> bool:
    """Whether ``processor`` (the cut) keeps no token outside the candidates, given the
    candidates' ``scores`` after the lowering processors."""
    values = scores[candidates.ids]
    floor = candidates.floor
    if isinstance(processor, TopKSampler):
        if processor.top_k > values.size:
            return False
        kth = np.partition(values, values.size - processor.top_k)[values.size - processor.top_k]
        return bool(kth > floor)
    assert isinstance(processor, MinPSampler)
    return bool(values.max() + np.float32(processor.log_min_p) > floor)
