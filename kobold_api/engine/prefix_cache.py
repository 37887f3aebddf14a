"""Reuse the KV cache of recent sequences for prompts that start the same way.

Kobold clients (SillyTavern included) resend the whole prompt every turn, so the next
request usually shares all but its last message with the previous one; once a chat fills
its window, it shares the card and most of the history but not the oldest turns, and
:mod:`.context_shift` moves the rest into place. Matching on token ids works for any
stateless prompt, not only our own chat. The pool is bounded in bytes and evicts the
least recently used entry, but always keeps the newest (see :meth:`PrefixCache.put`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .context_shift import MIN_RUN, ContextShifter, ShiftPlan, plan_shift
from .onnx_model import KVCache

#: Prompt tokens that always run again, however much of the prompt is cached. One would do
#: to get the next position's logits, but a one-token run takes the graph's decode kernels,
#: whose rounding differs from the multi-token prompt kernels a fresh prefill uses
#: (measured on the default int4 model: logits up to 0.7 apart; two or more tokens give
#: bit-identical logits). Running two keeps a resent prompt (a swipe) exactly reproducible.
RECOMPUTED_TOKENS = 2


@dataclass
class _Entry:
    """A pooled cache with what ``take``/``put`` need precomputed (they run on every request)."""

    cache: KVCache
    token_ids: np.ndarray
    nbytes: int


class PrefixCache:
    """An LRU pool of KV caches; a cache taken out belongs to its generation until put back."""

    def __init__(self, max_bytes: int, min_reuse_tokens: int = 8, shifter: ContextShifter | None = None) -> None:
        self.max_bytes = max_bytes
        self.min_reuse_tokens = min_reuse_tokens
        self.shifter = shifter
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._total_bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.reused_tokens = 0

    def take(self, prompt_ids: list[int]) -> tuple[KVCache | None, int]:
        """The cache that rebuilds the longest start of ``prompt_ids``, and that start's length.

        That is the longest shared prefix, or, with a :class:`ContextShifter`, a cached sequence
        with spans dropped (older turns a long chat let go) shifted into place. At most
        ``len(prompt_ids) - RECOMPUTED_TOKENS`` tokens are reused (see there).
        """
        prompt = np.asarray(prompt_ids, dtype=np.int64)
        limit = len(prompt) - RECOMPUTED_TOKENS
        # Without a shifter only the shared prefix counts (a run can never be long enough).
        min_run = MIN_RUN if self.shifter is not None else limit + 1
        with self._lock:
            best_key, best = None, ShiftPlan(())
            for key, entry in self._entries.items():
                if self.shifter is None and entry.token_ids[0] != prompt[0]:
                    continue
                plan = plan_shift(entry.token_ids, prompt, limit, min_run)
                if plan.reused > best.reused:
                    best_key, best = key, plan
            if best_key is None or best.reused < self.min_reuse_tokens:
                return None, 0
            self.hits += 1
            self.reused_tokens += best.reused
            entry = self._entries[best_key]
            if best.moves and self.shifter is not None and entry.cache.arena is None:
                # No whole buffers to shift in place: the entry stays for other prompts and the
                # request gets a shifted copy.
                self._entries.move_to_end(best_key)
                return self.shifter.shifted_copy(entry.cache, best, prompt_ids), best.reused
            if best.reused >= len(entry.token_ids) - 1 or entry.cache.arena is not None:
                # The request continues this very sequence, or branches from (or shifts) a
                # sequence that still holds whole decode buffers (a regenerated or trimmed last
                # reply, the usual chat branch; older turns dropped): it takes the cache over
                # and writes past the reused part in place, so nothing is copied; its own cache
                # replaces the entry, and the next branch from the same history starts from that.
                del self._entries[best_key]
                self._total_bytes -= entry.nbytes
                if best.moves and self.shifter is not None:
                    return self.shifter.shift_arena(entry.cache, best, prompt_ids), best.reused
                return entry.cache, best.reused
            # A branch from a cache copied out of a busy batch: the entry stays for other
            # branches and the caller gets a read-only view to copy from.
            self._entries.move_to_end(best_key)
            return KVCache(list(entry.cache.tensors), list(entry.cache.token_ids)), best.reused

    def put(self, cache: KVCache) -> None:
        """Pool ``cache``; the least recently used entries go while the pool holds more than
        ``max_bytes``, but the newest stays whatever its size: its keys were in use a moment ago,
        so keeping them adds nothing to the peak, and a chat's next turn must find its history
        (the engine also sizes the pool to hold at least one whole context: 1,400 tokens of keys
        are 320 MB at 3B, past the default 256 MB, and every turn of such a chat used to run its
        whole history again, 31 s at 3B on two cores where a branch that finds it takes 1.2 s)."""
        nbytes = cache.nbytes
        if not cache.token_ids:
            return
        entry = _Entry(cache, np.asarray(cache.token_ids, dtype=np.int64), nbytes)
        with self._lock:
            self._entries[id(cache)] = entry
            self._total_bytes += nbytes
            while self._total_bytes > self.max_bytes and len(self._entries) > 1:
                _, evicted = self._entries.popitem(last=False)
                self._total_bytes -= evicted.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._total_bytes = 0

    @property
    def total_bytes(self) -> int:
        return self._total_bytes

    def __len__(self) -> int:
        return len(self._entries)
