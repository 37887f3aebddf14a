"""Rows of sequences that advance together, one token per row per session run.

Two layouts, chosen by :func:`new_decode_batch`:

* :class:`SlotBatch` (CPU, GQA graphs): fixed key/value slots (:mod:`.kv_slots`), one
  buffer per layer bound as both ``past`` and ``present``, so GroupQueryAttention writes
  each new key in place; every buffer a step touches is allocated once and bound once per
  batch size. Nothing is copied or allocated per step (the concatenating layout re-copies
  the whole cache every token).
* :class:`ConcatBatch` (everything else, CUDA for now): ``present`` outputs become the next
  ``past`` inputs as ``OrtValue``s, so on CUDA the cache never leaves the device.

Both accept rows of different lengths: with GQA graphs the attention mask's row sum
tells the operator where each row's new key goes. Rows are removed by swapping the last
row into the freed slot, and callers keep their own row lists in the same order.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod

import numpy as np
import onnxruntime as ort

from .kv_slots import DeviceSlots, HostSlots, KVSlots, SlotOverflow, StepBuffers
from .onnx_model import KVCache, OnnxCausalLM, owned_ortvalue
from .sampling.candidates import RowLogits

#: Candidates per row a device batch sends to the host instead of the whole row.
TOP_CANDIDATES = 64


class DecodeBatch(ABC):
    """The rows being decoded; ``token_ids[row]`` are the tokens whose keys are cached."""

    def __init__(self, model: OnnxCausalLM) -> None:
        self.model = model
        self.token_ids: list[list[int]] = []

    @property
    def size(self) -> int:
        return len(self.token_ids)

    def admit(self, prompt_ids: list[int], cached: KVCache | None, reuse: int) -> np.ndarray:
        """Add a row for ``prompt_ids`` (its first ``reuse`` tokens' keys are in ``cached``);
        run the rest of the prompt and return the logits of its next position."""
        self.begin(prompt_ids, cached, reuse)
        logits = self.fill()
        assert logits is not None
        return logits

    @abstractmethod
    def begin(self, prompt_ids: list[int], cached: KVCache | None, reuse: int) -> None:
        """Reserve the next row for ``prompt_ids`` (its first ``reuse`` tokens' keys are in
        ``cached``); :meth:`fill` runs the rest of the prompt. One row fills at a time; until
        it is full, steps leave it alone and it is not counted in :attr:`size`."""

    @abstractmethod
    def fill(self, max_tokens: int = 0) -> np.ndarray | None:
        """Run the filling row's next ``max_tokens`` prompt tokens (0: all the rest; where
        the layout cannot stop part-way, all the rest anyway). Returns the logits of its next
        position once its prompt is done (the row then joins), else None."""

    @abstractmethod
    def abandon(self) -> None:
        """Drop the filling row (its request was cancelled part-way)."""

    @abstractmethod
    def step(self, tokens: list[int]) -> np.ndarray:
        """Feed one token per row; return logits [rows, vocab]."""

    def step_rows(self, tokens: list[int]) -> np.ndarray | list[RowLogits]:
        """:meth:`step`, whose rows may come as their top candidates with the whole row fetched
        only on demand (device slots; see :mod:`.sampling.candidates`)."""
        return self.step(tokens)

    def truncate(self, row: int, length: int) -> None:
        """Forget ``row``'s positions from ``length`` on (tokens taken back by a phrase ban):
        the next token is written at ``length``, as the attention mask's row sum says."""
        del self.token_ids[row][length:]

    @abstractmethod
    def release(self, row: int) -> KVCache:
        """Remove ``row`` (the last row takes its place) and return its cache."""

    def _swap_remove_ids(self, row: int) -> list[int]:
        ids = self.token_ids[row]
        last = self.token_ids.pop()
        if row < len(self.token_ids):
            self.token_ids[row] = last
        return ids


def new_decode_batch(model: OnnxCausalLM, max_rows: int = 1, capacity: int | None = None) -> DecodeBatch:
    """A batch of up to ``max_rows`` rows of at most ``capacity`` positions (default: the model's context)."""
    layout = model.decode_layout
    if layout == "concat":
        return ConcatBatch(model)
    # Captured graphs: a few batch sizes (1, 2, 4, ...), the rows padded up to the next one.
    buckets = [1 << power for power in range(max_rows.bit_length())] if model.cuda_graphs else None
    return SlotBatch(model, max_rows, capacity, buckets, memory="host" if layout == "slots" else "device")


def _decode_mask(lengths: list[int], width: int) -> np.ndarray:
    """Row ``r`` attends to its ``lengths[r]`` cached tokens plus the new one."""
    mask = np.zeros((len(lengths), width), dtype=np.int64)
    for row, length in enumerate(lengths):
        mask[row, : length + 1] = 1
    return mask


class SlotBatch(DecodeBatch):
    """Rows in fixed slots of a :class:`KVSlots` (row ``r`` is slot ``r``), bound once.

    Every input and output of a decode step lives in a buffer allocated with the batch: the
    token ids [rows, 1], the attention mask [rows, capacity] (as wide as a slot: GQA reads each
    row's length from its sum, so the width costs nothing and never changes) and the logits.
    A step writes the new tokens and one mask element per row in place and runs the binding of
    its bucket, made once per bucket: after warm-up a step creates no binding and no OrtValue.
    A step of ``n`` rows runs the smallest bucket of at least ``n`` rows; the rows past ``n``
    are free slots fed a dummy token at position 0, whose outputs are ignored (on the CPU every
    size is a bucket, so nothing is padded; captured CUDA graphs need a few fixed sizes).

    ``memory``: ``host`` (:class:`HostSlots`, the CPU provider's) or ``device``
    (:class:`DeviceSlots`: buffers on the session's device, the CUDA layout; on the CPU
    provider it runs the same code in host memory, which is how the tests check it).
    """

    def __init__(self, model: OnnxCausalLM, max_rows: int = 1, capacity: int | None = None,
                 buckets: list[int] | None = None, memory: str = "host") -> None:
        super().__init__(model)
        self.max_rows = max_rows
        self.capacity = capacity or model.info.context_length
        self.buckets = sorted({size for size in (buckets or range(1, max_rows + 1)) if size < max_rows} | {max_rows})
        self._memory = memory
        self.slots = self._new_slots()
        self.slots.owner = weakref.ref(self)
        self._io = StepBuffers(max_rows, self.capacity, model.vocab_size, None if memory == "host" else model.device,
                               model.helpers, TOP_CANDIDATES if memory == "device" else 0)
        self._ids, self._mask = self._io.ids, self._io.mask
        self._step_bindings: dict[int, ort.IOBinding] = {}
        self._prefill_bindings: dict[int, ort.IOBinding] = {}
        #: The row being filled (slot ``size``): its prompt and how much of it is written.
        self._filling: tuple[list[int], int] | None = None
        self._last_bucket = 0

    def _step_binding(self, bucket: int) -> ort.IOBinding:
        """Slots [0, bucket) with the token buffer as their input: made once per bucket."""
        if bucket not in self._step_bindings:
            self._step_bindings[bucket] = self.model.bind_slots(self.slots, 0, bucket, self._io, ids=True)
        return self._step_bindings[bucket]

    def _prefill_binding(self, slot: int) -> ort.IOBinding:
        """Slot ``slot`` alone; its prompt is bound anew by each prefill."""
        if slot not in self._prefill_bindings:
            self._prefill_bindings[slot] = self.model.bind_slots(self.slots, slot, 1, self._io, ids=False)
        return self._prefill_bindings[slot]

    #: A filling prompt's last run takes at least this many tokens: one token alone takes the
    #: decode kernels, whose rounding differs from the prompt kernels' (see prefix_cache).
    MIN_LAST_CHUNK = 2

    def _new_slots(self) -> KVSlots:
        heads, dim, dtype = self.model.kv_shape
        if self._memory == "host":
            return HostSlots(self.model.num_kv_tensors, self.max_rows, heads, self.capacity, dim, dtype)
        return DeviceSlots(self.model.num_kv_tensors, self.max_rows, heads, self.capacity, dim, dtype,
                           self.model.device, self.model.helpers)

    def _adopt(self, slots: KVSlots) -> None:
        """Take over other slots of the same shape (fresh ones, our own parked ones, or those
        of a batch that is gone): the bindings pointed at the old ones."""
        self.slots = slots
        slots.owner = weakref.ref(self)
        self._step_bindings.clear()
        self._prefill_bindings.clear()

    def begin(self, prompt_ids: list[int], cached: KVCache | None, reuse: int) -> None:
        assert self._filling is None, "one row fills at a time"
        slot = self.size
        if slot >= self.max_rows:
            raise SlotOverflow(f"all {self.max_rows} slots are in use")
        if len(prompt_ids) > self.capacity:
            raise SlotOverflow(f"a prompt of {len(prompt_ids)} tokens does not fit a slot of {self.capacity}")
        home = cached.home if cached is not None and reuse else None
        if slot == 0 and home is not None and home.shape == self.slots.shape and home.is_parked(cached) \
                and home.free_to_adopt(self):
            # A chat's next turn on an idle batch: its keys are still parked in slot 0.
            if home is not self.slots:
                self._adopt(home)
            self.slots.claim(0, adopter=cached)
        else:
            self.slots.claim(slot)
            if cached is not None and reuse:
                self.slots.write(slot, cached.tensors, reuse)
        self._filling = (list(prompt_ids), reuse)
        self._set_filled(slot, reuse)

    def _set_filled(self, slot: int, done: int) -> None:
        """The mask of a slot whose first ``done`` prompt positions are written: one more
        position open, so a padded step's dummy token lands where the next part goes."""
        self._mask[slot] = 0
        self._mask[slot, :done + 1] = 1

    def fill(self, max_tokens: int = 0) -> np.ndarray | None:
        assert self._filling is not None, "no row is filling"
        prompt, done = self._filling
        slot = self.size
        end = len(prompt) if not max_tokens or len(prompt) - done - max_tokens < self.MIN_LAST_CHUNK \
            else done + max_tokens
        self._mask[slot] = 0
        self._mask[slot, :end] = 1
        binding = self._prefill_binding(slot)
        binding.bind_cpu_input("input_ids", np.asarray([prompt[done:end]], dtype=np.int64))
        self._io.upload()
        self.model.run_shared(binding, 1, end - done)
        if end < len(prompt):
            self._filling = (prompt, end)
            self._set_filled(slot, end)
            return None
        self._filling = None
        self.token_ids.append(prompt)
        return self._io.logits(slot, 1)[0].copy()

    def abandon(self) -> None:
        if self._filling is not None:
            self._filling = None
            self._free(self.size)

    def _free(self, slot: int) -> None:
        self.slots.forget(slot)
        self._mask[slot] = 0
        self._mask[slot, 0] = 1

    def step(self, tokens: list[int]) -> np.ndarray:
        self._run_step(tokens)
        return self._io.logits(0, len(tokens))

    def _run_step(self, tokens: list[int]) -> None:
        rows = self.size
        for ids in self.token_ids:
            if len(ids) >= self.capacity:
                raise SlotOverflow(f"a row of {len(ids)} tokens is at its slot's capacity ({self.capacity})")
        bucket = next(size for size in self.buckets if size >= rows)
        self._ids[:rows, 0] = tokens
        self._ids[rows:bucket, 0] = 0
        for row, ids in enumerate(self.token_ids):
            self._mask[row, len(ids)] = 1
        self._io.upload()
        self.model.run_shared(self._step_binding(bucket), bucket, 1, graph=self.buckets.index(bucket))
        self._last_bucket = bucket
        for ids, token in zip(self.token_ids, tokens):
            ids.append(token)

    def step_rows(self, tokens: list[int]) -> np.ndarray | list[RowLogits]:
        self._run_step(tokens)
        rows = self._io.top_rows(self._last_bucket, len(tokens))
        return rows if rows is not None else self._io.logits(0, len(tokens))

    def truncate(self, row: int, length: int) -> None:
        self._mask[row, max(length, 1):len(self.token_ids[row])] = 0
        super().truncate(row, length)

    def release(self, row: int) -> KVCache:
        length = len(self.token_ids[row])
        last = self.size - 1
        if last == 0 and self._filling is None:
            # The last row leaves: its keys stay where they are, parked for the prefix pool (a
            # chat's next turn takes them back without a copy).
            cache = self.slots.parked_cache(self._swap_remove_ids(row))
            self.slots.park(cache)
            if isinstance(self.slots, HostSlots):
                # Host slots go to the pool whole and the batch goes on in fresh ones (mapped, not
                # yet touched: nearly free), so a request in between never copies the parked
                # keys out; the next turn takes the parked slots back. On a device the slots
                # are allocated whole: they stay, and a copy of the keys goes to the pool.
                self._adopt(self._new_slots())
            self._mask[0] = 0
            self._mask[0, 0] = 1
        else:
            cache = KVCache(self.slots.read(row, length), self._swap_remove_ids(row))
            if row != last:
                self.slots.move(last, row, len(self.token_ids[row]))
                self._mask[row] = self._mask[last]
            self._free(last)
            if self._filling is not None:  # the filling row moves down: it stays at slot ``size``
                self.slots.move(last + 1, last, self._filling[1])
                self._mask[last] = self._mask[last + 1]
                self._free(last + 1)
        return cache


class ConcatBatch(DecodeBatch):
    """``present`` outputs (concatenated past + new) become the next ``past`` inputs."""

    def truncate(self, row: int, length: int) -> None:
        if length >= len(self.token_ids[row]):
            return
        super().truncate(row, length)
        if self.size == 1:  # graphs without GQA place keys by width, so the tensors are cut too
            self._tensors = _cut(self._tensors, length, self.model)

    def __init__(self, model: OnnxCausalLM) -> None:
        super().__init__(model)
        self._tensors: list[ort.OrtValue] = []
        self._filling: tuple[list[int], KVCache] | None = None

    @property
    def _width(self) -> int:
        return int(self._tensors[0].shape()[2]) if self._tensors else 0

    def begin(self, prompt_ids: list[int], cached: KVCache | None, reuse: int) -> None:
        cache = cached if cached is not None and reuse else self.model.new_cache()
        truncate(cache, reuse if cached is not None else 0, self.model)
        self._filling = (list(prompt_ids), cache)

    def fill(self, max_tokens: int = 0) -> np.ndarray | None:
        """The whole rest of the prompt: rows join by concatenation, which cannot pause."""
        assert self._filling is not None, "no row is filling"
        prompt_ids, cache = self._filling
        self._filling = None
        logits = self.model.forward(prompt_ids[cache.length:], cache)
        self._join(cache)
        return logits

    def abandon(self) -> None:
        self._filling = None

    def _join(self, cache: KVCache) -> None:
        device = self.model.device
        if not self.size:
            self._tensors = list(cache.tensors)
        else:
            width = max(self._width, cache.length)
            self._tensors = [
                owned_ortvalue(np.concatenate([_pad_length(rows.numpy(), width), _pad_length(new.numpy(), width)]),
                               device)
                for rows, new in zip(self._tensors, cache.tensors)
            ]
        self.token_ids.append(list(cache.token_ids))

    def step(self, tokens: list[int]) -> np.ndarray:
        lengths = [len(ids) for ids in self.token_ids]
        logits, self._tensors = self.model.run_concat([[token] for token in tokens],
                                                      _decode_mask(lengths, self._width + 1), self._tensors,
                                                      positions=[[length] for length in lengths])
        for ids, token in zip(self.token_ids, tokens):
            ids.append(token)
        return logits

    def release(self, row: int) -> KVCache:
        length = len(self.token_ids[row])
        last = self.size - 1
        order = [last if index == row else index for index in range(last)]
        remaining = max((len(self.token_ids[index]) for index in order), default=0)
        extracted, kept = [], []
        device = self.model.device
        for tensor in self._tensors:
            array = tensor.numpy()
            extracted.append(owned_ortvalue(array[row:row + 1, :, :length], device))
            if order:
                kept.append(owned_ortvalue(array[order, :, :remaining], device))
        self._tensors = kept
        return KVCache(extracted, self._swap_remove_ids(row))


def truncate(cache: KVCache, length: int, model: OnnxCausalLM) -> None:
    """Keep the first ``length`` positions of every layer's keys and values."""
    if length >= cache.length:
        return
    cache.tensors = _cut(cache.tensors, length, model)
    del cache.token_ids[length:]


def _cut(tensors: list[ort.OrtValue], length: int, model: OnnxCausalLM) -> list[ort.OrtValue]:
    """Copies of [batch, heads, positions, dim] keys or values holding their first ``length`` positions."""
    return [owned_ortvalue(t.numpy()[:, :, :length], model.device) for t in tensors]


def _pad_length(array: np.ndarray, width: int) -> np.ndarray:
    """Right-pad a [batch, heads, length, dim] cache with zeros to ``width`` positions."""
    missing = width - array.shape[2]
    if missing <= 0:
        return array
    return np.pad(array, ((0, 0), (0, 0), (0, missing), (0, 0)))
