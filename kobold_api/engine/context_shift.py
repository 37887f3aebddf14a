"""Context shifting: reuse a cached sequence when the new prompt drops spans of it.

A long chat outgrows its window; every turn the client (or our chat builder, or the server's
cut of an over-long prompt) drops the oldest messages and keeps the card, so the new prompt is
the cached sequence with one or more spans removed and new text appended. Plain prefix reuse
keeps only what comes before the first removed span. Here the later runs are kept too: their
values move to their new positions as they are, and their keys, stored already rotated by the
attention operator (rotary inside GroupQueryAttention), are rotated back by the distance they
moved, with each layer's own frequencies (rotary scaling, partial rotary and sliding layers'
own base included: the manifest's ``rotary`` section says which).

What a shift does not redo: the kept tokens' keys and values in layers past the first were
computed while those tokens could see the dropped ones, exactly as in llama.cpp's K-shift and
KoboldCpp's ContextShift. Layer 0 becomes exactly what a fresh prefill computes; deeper layers
keep a trace of the dropped text. Graphs without a ``rotary`` section (the builder's or
optimum's fallbacks) are never shifted: they get the plain prefix and a prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .onnx_model import KVCache, owned_ortvalue
from .rotary import RotaryLayout
from .shift_graph import ShiftGraphs

#: A kept run shorter than this is not worth a shift (and short matches are often chance).
MIN_RUN = 16
#: Matches of a run's first MIN_RUN tokens looked at, each extended to its full length.
_MAX_CANDIDATES = 8


@dataclass(frozen=True)
class Segment:
    """``length`` cached positions from ``source`` that the new prompt has at ``target``."""

    source: int
    target: int
    length: int

    @property
    def distance(self) -> int:
        return self.source - self.target


@dataclass(frozen=True)
class ShiftPlan:
    """The runs of a cached sequence a prompt keeps, in order, packed from position 0."""

    segments: tuple[Segment, ...]

    @property
    def reused(self) -> int:
        """How many of the prompt's first tokens the shifted cache holds."""
        return sum(segment.length for segment in self.segments)

    @property
    def moves(self) -> bool:
        return any(segment.distance for segment in self.segments)

    @property
    def moved_tokens(self) -> int:
        return sum(segment.length for segment in self.segments if segment.distance)


def common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    """Number of leading ids two sequences share (vectorized: prompts run to thousands of ids)."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differs = np.flatnonzero(a[:n] != b[:n])
    return int(differs[0]) if differs.size else n


def plan_shift(cached: np.ndarray, prompt: np.ndarray, limit: int, min_run: int = MIN_RUN) -> ShiftPlan:
    """The cached runs that rebuild the longest start of ``prompt`` (at most ``limit`` tokens).

    The shared prefix first (it does not move), then repeatedly the longest run of the rest of
    ``cached`` that continues the prompt where it stands, if it is at least ``min_run`` long.
    Runs only move towards the start (dropped spans), never past each other.
    """
    limit = min(limit, len(prompt))
    prefix = min(common_prefix_length(cached, prompt), limit)
    segments = [Segment(0, 0, prefix)] if prefix else []
    source, target = prefix, prefix
    while limit - target >= min_run and len(cached) - source >= min_run:
        want = prompt[target:target + min_run]
        windows = sliding_window_view(cached[source:], min_run)
        hits = np.flatnonzero((windows == want).all(axis=1))[:_MAX_CANDIDATES]
        if hits.size == 0:
            break
        best_start, best_length = 0, 0
        for hit in hits:
            start = source + int(hit)
            length = min(common_prefix_length(cached[start:], prompt[target:]), limit - target)
            if length > best_length:
                best_start, best_length = start, length
        segments.append(Segment(best_start, target, best_length))
        source, target = best_start + best_length, target + best_length
    return ShiftPlan(tuple(segments))


def apply_shift(layers: list[np.ndarray], plan: ShiftPlan, rotary: RotaryLayout, row: int = 0) -> None:
    """Move ``plan``'s runs into place in [rows, kv_heads, positions, head_dim] arrays, in place.

    ``layers`` alternate key, value per layer (the graph's past inputs in order). Runs are moved
    in order and only towards the start, so a run never lands on one still to be moved.
    """
    for segment in plan.segments:
        if not segment.distance:
            continue
        src = slice(segment.source, segment.source + segment.length)
        dst = slice(segment.target, segment.target + segment.length)
        for index, array in enumerate(layers):
            if index % 2 == 0:  # keys: rotated back by the distance moved
                array[row, :, dst] = rotary.rotate(index // 2, array[row, :, src], segment.distance)
            else:  # values: position-free
                array[row, :, dst] = array[row, :, src]


class ContextShifter:
    """Applies plans to pooled caches of one model (its rotary layout and device)."""

    def __init__(self, rotary: RotaryLayout, device: str, graphs: ShiftGraphs | None = None) -> None:
        self.rotary = rotary
        self.device = device
        #: Shifts pooled copies where they live (device slots); without them, through host memory.
        self.graphs = graphs
        self.shifts = 0
        self.moved_tokens = 0

    def shift_arena(self, cache: KVCache, plan: ShiftPlan, prompt: list[int]) -> KVCache:
        """``cache`` (which holds whole decode buffers, row 0) shifted in place: nothing is copied
        but the moved runs, and the cache keeps its buffers for the batch to adopt."""
        assert cache.arena is not None
        apply_shift(cache.arena, plan, self.rotary)
        cache.token_ids = list(prompt[:plan.reused])
        self._count(plan)
        return cache

    def shifted_copy(self, cache: KVCache, plan: ShiftPlan, prompt: list[int]) -> KVCache:
        """A new cache of ``plan.reused`` positions built from ``cache`` (left as it was: it may
        stay pooled for other prompts). With :attr:`graphs` on the cache's device; otherwise on
        the host (for a device cache, a round trip through host memory)."""
        if self.graphs is not None:
            return self._shifted_on_device(cache, plan, prompt)
        copies = [np.array(tensor.numpy()[:, :, :cache.length], copy=True) for tensor in cache.tensors]
        apply_shift(copies, plan, self.rotary)
        self._count(plan)
        return KVCache([owned_ortvalue(array[:, :, :plan.reused], self.device) for array in copies],
                       list(prompt[:plan.reused]))

    def _shifted_on_device(self, cache: KVCache, plan: ShiftPlan, prompt: list[int]) -> KVCache:
        assert self.graphs is not None
        index = np.concatenate([np.arange(s.source, s.source + s.length, dtype=np.int64) for s in plan.segments])
        distances = np.concatenate([np.full(s.length, s.distance, dtype=np.int64) for s in plan.segments])
        tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # layers usually share their frequencies
        tensors = []
        for number, tensor in enumerate(cache.tensors):
            if number % 2:  # values: position-free
                tensors.append(self.graphs.gather(tensor, index))
                continue
            layer = number // 2
            key = id(self.rotary.layer_freqs[layer])
            if key not in tables:
                tables[key] = self.graphs.tables(layer, distances)
            tensors.append(self.graphs.rotate(tensor, index, tables[key]))
        self._count(plan)
        return KVCache(tensors, list(prompt[:plan.reused]))

    def _count(self, plan: ShiftPlan) -> None:
        self.shifts += 1
        self.moved_tokens += plan.moved_tokens
