"""Reuse the KV cache of recent sequences for prompts that start the same way.

Kobold clients (SillyTavern included) resend the whole prompt every turn, so the next
request usually shares all but its last message with the previous one. Matching on
token ids works for any stateless prompt, not only our own chat. The pool is bounded
in bytes and evicts the least recently used entry.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np

from .onnx_model import owned_ortvalue

if TYPE_CHECKING:
    from .onnx_model import KVCache, OnnxCausalLM


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Number of leading ids two sequences share (vectorized: prompts run to thousands of ids)."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differs = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differs[0]) if differs.size else n


class PrefixCache:
    """An LRU pool of KV caches; a cache taken out belongs to its generation until put back."""

    def __init__(self, max_bytes: int, min_reuse_tokens: int = 8) -> None:
        self.max_bytes = max_bytes
        self.min_reuse_tokens = min_reuse_tokens
        self._entries: OrderedDict[int, KVCache] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.reused_tokens = 0

    def take(self, prompt_ids: list[int], model: OnnxCausalLM) -> KVCache:
        """The cache sharing the longest prefix with ``prompt_ids``, cut to that prefix, or a new one.

        At most ``len(prompt_ids) - 1`` tokens are reused: the last prompt token must run
        again to give the logits of the next position.
        """
        with self._lock:
            best_key, best_length = None, 0
            for key, entry in self._entries.items():
                length = min(common_prefix_length(entry.token_ids, prompt_ids), len(prompt_ids) - 1)
                if length > best_length:
                    best_key, best_length = key, length
            if best_key is None or best_length < self.min_reuse_tokens:
                return model.new_cache()
            cache = self._entries.pop(best_key)
            self.hits += 1
            self.reused_tokens += best_length
        truncate(cache, best_length, model)
        return cache

    def put(self, cache: KVCache) -> None:
        if not cache.token_ids or cache_bytes(cache) > self.max_bytes:
            return
        with self._lock:
            self._entries[id(cache)] = cache
            while sum(cache_bytes(c) for c in self._entries.values()) > self.max_bytes:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def cache_bytes(cache: KVCache) -> int:
    total = 0
    for tensor in cache.tensors:
        shape = tensor.shape()
        total += int(np.prod(shape)) * (2 if "float16" in tensor.data_type() else 4)
    return total


def truncate(cache: KVCache, length: int, model: OnnxCausalLM) -> None:
    """Keep the first ``length`` positions of every layer's keys and values."""
    if length >= cache.length:
        return
    device = "cuda" if model.provider == "cuda" else "cpu"
    cache.tensors = [owned_ortvalue(t.numpy()[:, :, :length, :], device) for t in cache.tensors]
    del cache.token_ids[length:]
