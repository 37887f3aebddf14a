"""Fixed key/value slots: each layer's keys and values in one buffer allocated once.

A :class:`KVSlots` holds ``[slots, kv_heads, capacity, head_dim]`` per past/present tensor. A
decode batch binds the same memory as a layer's ``past`` and ``present``, so
GroupQueryAttention writes each new key in place, and the buffers never move: bindings made
once stay valid for every later step (what CUDA graph capture needs too).

On the CPU the buffers are anonymous memory maps: a page costs memory only once a key is
written to it, so a slot sized for the whole context costs what its row really holds, and a
slot whose row left gives its pages back (``MADV_DONTNEED``).

A slot holds either a live row or, when it is slot 0 of an idle batch, the last row's keys
parked for the prefix pool (a chat's next turn takes them back without a copy). Before any
other row writes there the parked keys are copied out: a slot is never shared between a live
row and the pool.
"""

from __future__ import annotations

import mmap
import weakref
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

if TYPE_CHECKING:
    from .onnx_model import KVCache

_PAGE = mmap.PAGESIZE


#: The shortest slot a budget may leave (a shorter context is of no use to a chat).
MIN_SLOT_TOKENS = 256


def plan_slots(bytes_per_token: int, rows: int, context: int, budget: int) -> tuple[int, int]:
    """(rows, positions per slot) within ``budget`` bytes: all ``rows`` at ``context`` if they
    fit, else fewer rows at the full context, else one row of what the budget holds."""
    slot = bytes_per_token * context
    if budget >= slot:
        return max(1, min(rows, budget // slot)), context
    return 1, max(MIN_SLOT_TOKENS, min(context, budget // bytes_per_token))


class SlotOverflow(RuntimeError):
    """A row would write past its slot's capacity (refused before anything is written)."""


class KVSlots:
    """``tensors`` buffers of ``[slots, heads, capacity, dim]``, and who holds slot 0's keys."""

    def __init__(self, tensors: int, slots: int, heads: int, capacity: int, dim: int, dtype: type) -> None:
        self.shape = (slots, heads, capacity, dim)
        self.dtype = np.dtype(dtype)
        size = int(np.prod(self.shape)) * self.dtype.itemsize
        # Private: pages given back read as zeros and are really freed (shared ones would persist).
        self._maps = [mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                      for _ in range(tensors)]
        self.buffers = [np.frombuffer(memory, dtype=self.dtype, count=int(np.prod(self.shape))).reshape(self.shape)
                        for memory in self._maps]
        self._parked: weakref.ref[KVCache] | None = None
        #: The batch whose rows live here; another batch may take the slots over only once it is gone.
        self.owner: weakref.ref[object] | None = None

    def free_to_adopt(self, batch: object) -> bool:
        """Whether ``batch`` may use these slots: its own, or those of a batch that is gone."""
        owner = self.owner() if self.owner is not None else None
        return owner is None or owner is batch

    @property
    def slots(self) -> int:
        return self.shape[0]

    @property
    def capacity(self) -> int:
        return self.shape[2]

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot in one tensor (the stride between slots)."""
        return int(np.prod(self.shape[1:])) * self.dtype.itemsize

    def pointer(self, tensor: int, slot: int = 0) -> int:
        """Address of ``slot`` in tensor ``tensor`` (what a binding points at)."""
        return int(self.buffers[tensor].ctypes.data) + slot * self.slot_bytes

    def view(self, slot: int) -> list[np.ndarray]:
        """Every tensor's ``[1, heads, capacity, dim]`` view of ``slot`` (shares memory)."""
        return [buffer[slot:slot + 1] for buffer in self.buffers]

    def write(self, slot: int, arrays: list[np.ndarray], length: int) -> None:
        """Copy the first ``length`` positions of ``arrays`` ([1, heads, >=length, dim] each) into ``slot``."""
        if length > self.capacity:
            raise SlotOverflow(f"{length} positions do not fit a slot of {self.capacity}")
        for buffer, array in zip(self.buffers, arrays):
            buffer[slot, :, :length] = array[0, :, :length]

    def move(self, source: int, target: int, length: int) -> None:
        """Copy ``source``'s first ``length`` positions into ``target`` (a leaving row's place)."""
        for buffer in self.buffers:
            buffer[target, :, :length] = buffer[source, :, :length]

    def read(self, slot: int, length: int) -> list[np.ndarray]:
        """``slot``'s first ``length`` positions of every tensor as [1, heads, length, dim] arrays,
        in one new block (one allocation instead of one per tensor)."""
        _, heads, _, dim = self.shape
        block = np.empty((len(self.buffers), 1, heads, length, dim), dtype=self.dtype)
        for copy, buffer in zip(block, self.buffers):
            copy[0] = buffer[slot, :, :length]
        return list(block)

    def forget(self, slot: int, keep: int = 0) -> None:
        """Give back the pages of ``slot`` past its first ``keep`` positions (they read as zeros after)."""
        _, heads, capacity, dim = self.shape
        row = capacity * dim * self.dtype.itemsize
        for memory in self._maps:
            for head in range(heads):
                start = slot * self.slot_bytes + head * row
                first = -(-(start + keep * dim * self.dtype.itemsize) // _PAGE) * _PAGE
                last = (start + row) // _PAGE * _PAGE
                if last > first:
                    memory.madvise(mmap.MADV_DONTNEED, first, last - first)

    def held_bytes(self, length: int) -> int:
        """Memory a slot holding ``length`` positions uses: its written pages, every head and tensor."""
        _, heads, _, dim = self.shape
        per_head = -(-length * dim * self.dtype.itemsize // _PAGE) * _PAGE
        return len(self.buffers) * heads * per_head

    # --- slot 0 parked for the prefix pool ---------------------------------------------
    def park(self, cache: KVCache) -> None:
        """``cache`` (slot 0's keys, handed to the pool) now holds slot 0."""
        self._parked = weakref.ref(cache)

    def is_parked(self, cache: KVCache) -> bool:
        return self._parked is not None and self._parked() is cache

    def claim(self, slot: int, adopter: KVCache | None = None) -> None:
        """A row is about to write ``slot``: parked keys there (unless ``adopter`` is the cache
        holding them, which takes them over) are first copied out into their cache."""
        if slot != 0 or self._parked is None:
            return
        parked, self._parked = self._parked(), None
        if parked is None or parked is adopter or parked.arena is None:
            return
        parked.tensors = [ort.OrtValue.ortvalue_from_numpy(array) for array in self.read(0, parked.length)]
        parked.arena = parked.home = None
