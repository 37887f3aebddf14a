"""The precision the user picks (``--quant``), turned into a decision per tensor.

| quant | CPU | CUDA | matrices | output matrix / embedding |
|---|---|---|---|---|
| auto | mixed under 0.5B parameters; above, fit for a quantized GGUF, else int4 | fp16 | | |
| fit | yes | yes | 4-bit, and 8-bit where the budget (1.10x the file's bytes) allows | 8-bit |
| int4 | yes | yes | 4-bit blocks of 32; Q4_0 copied exactly | 8-bit (as llama.cpp keeps it) |
| mixed | yes | yes | 4-bit ffn gate/up in all but the first and last two layers, 8-bit elsewhere | 8-bit |
| int8 | yes | yes | 8-bit blocks of up to 64; Q8_0 and Q4_0 copied exactly (blocks of 32) | 8-bit |
| fp16 | no (no fast fp16 kernels on the CPU) | yes | float16 | float16 |
| fp32 | yes | no (GroupQueryAttention on CUDA takes fp16) | float32 | float32 |

Under int4 a GGUF tensor the file stores with 6.5 or more bits per weight while most of
the file has fewer (Q6_K ``attn_v`` in a Q4_K_M file, a Q8_0 output matrix) keeps 8 bits:
the file's author spent bits there on purpose, and llama.cpp's own mixes do the same.

``fit`` holds a GGUF's bytes per token: ONNX Runtime's CPU kernels take 4 or 8 bits with fp32
scales, so a K-quant's 4.5-6.6 bits cannot be copied; the plan starts every matrix at 4 bits
and moves whole matrices to 8 bits, most valuable first, while the total stays within
:data:`FIT_BUDGET` times the file's own matrix bytes (see :meth:`Precision.plan`).
8-bit matrices quantized here use blocks of up to 64 (0.5 bits of scale per weight instead of
1); Q8_0 and Q4_0 blocks are still copied bit for bit where their own bits are kept.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ...settings import QUANTS
from . import quantize
from .quantize import Blocks
from .sources import SourceError, Tensor, TensorSource

_REFUSED = {("cpu", "fp16"): "fp16 runs only on CUDA; on the CPU pick fp32, int8 or int4",
            ("cuda", "fp32"): "fp32 is not built for CUDA (its attention kernel takes fp16); pick fp16, int8 or int4"}
_HIGH_BITS = 6.5
#: Below this many parameters ``auto`` picks ``mixed`` on the CPU. Measured on the 2-core CPU
#: at 135M (SmolLM2's Q4_1 file; perplexity on 700 tokens, llama.cpp's own 19.05): int4 22.34
#: (1.17x), int8 19.06, mixed 19.65 (1.03x) at 1.1x int8's decode speed; ``fit`` holds the
#: file's bytes but costs this small model 1.10-1.12x llama.cpp's perplexity on its Q4_1 file
#: (benchmarks/gguf_types.py). At 1B, 8-bit tensors cost a lone stream more (int8 decodes 28%
#: slower than int4: 22.8 vs 31.5 tok/s, reading twice the bytes per token), so larger models
#: read no more bytes than their file (``fit``) or go int4.
MIXED_AUTO_MAX_PARAMETERS = 500_000_000
#: ``mixed``: the layer parts kept in 4 bits, and how many layers at each end keep 8 bits
#: everywhere (the first and last layers are the most sensitive to rounding, as in
#: llama.cpp's own mixes). Each 4-bit tensor alone costs little perplexity; 4-bit attention
#: or ffn_down cost more than they save (gate/up/down 4-bit: 19.94; all 4-bit: 22.34).
MIXED_4BIT_PARTS = frozenset({"gate", "up", "gate_up"})
MIXED_EDGE_LAYERS = 2
#: ``fit``: the prepared matrices may take this many times the file's own bytes for them.
FIT_BUDGET = 1.10
#: ``fit``'s 4-bit blocks: size, and whether they carry zero points (see
#: ``quantize.quantize_int4_zero_point``).
FIT_BLOCK_4BIT = 32
FIT_ZERO_POINTS = True


@dataclass(frozen=True)
class Storage:
    """How one matrix (or fused group) is stored: ``bits`` per code, a fp32 scale per
    ``block``, and a zero point per block if ``zero_points``."""

    bits: int
    block: int
    zero_points: bool = False

    def nbytes(self, rows: int, cols: int) -> int:
        blocks = -(-cols // self.block)
        zero_points = (blocks if self.bits == 8 else -(-blocks // 2)) if self.zero_points else 0
        return rows * (blocks * self.block * self.bits // 8 + blocks * 4 + zero_points)


def resolve_quant(quant: str, device: str, parameters: int | None = None, quantized_file: bool = False) -> str:
    """``auto`` -> fp16 on CUDA; on the CPU mixed for models under
    :data:`MIXED_AUTO_MAX_PARAMETERS`, above it ``fit`` for a quantized GGUF
    (``quantized_file``) and int4 otherwise or when the size is unknown (models the importer
    cannot read go to the builder, whose CPU build is int4). Combinations that cannot run are
    refused."""
    quant = (quant or "auto").lower()
    if quant not in QUANTS:
        raise SourceError(f"unknown quant {quant!r}: pick one of {', '.join(QUANTS)}")
    if quant == "auto":
        if device == "cuda":
            return "fp16"
        small = parameters is not None and parameters < MIXED_AUTO_MAX_PARAMETERS
        if quantized_file and not small:
            return "fit"
        return "mixed" if small else "int4"
    if (device, quant) in _REFUSED:
        raise SourceError(_REFUSED[(device, quant)])
    return quant


def bits_per_weight(dtype: str) -> float:
    if dtype in ("F32",):
        return 32.0
    if dtype in ("F16", "BF16"):
        return 16.0
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[dtype]]
    return size * 8 / block


class Precision:
    """Decides how each matrix is stored in the graph: :meth:`plan` once for all of them,
    then :meth:`blocks` / :meth:`embedding` convert one at a time."""

    #: The output matrix (and the embedding it may share) in quantized builds.
    OUTPUT_BITS = 8
    #: ``fit``'s order of moving groups to 8 bits (:meth:`_fit_order`), by part.
    FIT_PART_ORDER = ("q", "qkv", "down", "o", "gate", "up", "gate_up")

    def __init__(self, quant: str, device: str, source: TensorSource) -> None:
        self.source = source
        self._file_bits = _dominant_bits(source)
        self.quant = resolve_quant(quant, device, source.config.parameters, quantized_file(source))
        self.device = device
        self.float_type = np.dtype(np.float16 if device == "cuda" else np.float32)
        self.quantized = self.quant in ("int4", "int8", "mixed", "fit")
        self.num_layers = source.config.num_layers
        self._plan: dict[tuple[str, ...], Storage] = {}
        self.planned_bytes = 0
        self.file_bytes = 0
        self._pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="quantize")

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)

    # ------------------------------------------------------------------ the plan

    def plan(self, groups: list[list[str]], reserve: int = 0) -> None:
        """Decide the storage of every matrix group (the names one fused MatMul reads) and of
        the embedding/output matrix before anything is written.

        Under ``fit`` the groups start at 4 bits; then, in :meth:`_fit_order`, each group
        whose move to 8 bits still fits in :data:`FIT_BUDGET` times the file's matrix bytes,
        less ``reserve`` (what the graph stores besides matrices and norms: rotary tables),
        moves. The other quants decide a group from its parts (:meth:`_bits`): the widest wins."""
        if not self.quantized:
            return
        tensors = {name: self.source.require(name) for group in groups for name in group}
        storages = {tuple(group): self._group_storage([tensors[n] for n in group]) for group in groups}
        outputs = [t for t in (self.source.get("embed"), self.source.get("lm_head")) if t is not None]
        fixed = sum(self._storage([t], self.OUTPUT_BITS).nbytes(*t.shape) for t in outputs)
        self.file_bytes = sum(t.nbytes for t in list(tensors.values()) + outputs)
        if self.quant == "fit":
            spent = fixed + sum(storages[key].nbytes(*_shape([tensors[n] for n in key])) for key in storages)
            budget = FIT_BUDGET * self.file_bytes - reserve
            for key in self._fit_order(storages, tensors):
                parts = [tensors[n] for n in key]
                wide = self._storage(parts, 8)
                extra = wide.nbytes(*_shape(parts)) - storages[key].nbytes(*_shape(parts))
                if spent + extra <= budget:
                    storages[key], spent = wide, spent + extra
        self._plan = storages
        self.planned_bytes = fixed + sum(st.nbytes(*_shape([tensors[n] for n in key])) for key, st in storages.items())

    def _fit_order(self, storages: dict[tuple[str, ...], Storage], tensors: dict[str, Tensor]) -> list[tuple[str, ...]]:
        """The 4-bit groups, the first to move to 8 bits first: the attention's query/key/value
        projections (the default model's perplexity moved most with them: 26.1 -> 22.7 on its
        Q4_K_M file when five more layers' projections went to 8 bits), then groups holding a
        part the file stores in 6.5 or more bits (its author spent bits there, as llama.cpp's
        mixes do on ``attn_v``/``ffn_down``), then the first and last layers, then by part
        (ffn_down and the attention output before ffn gate/up, which ``mixed`` measured as the
        least sensitive), from the edges inward."""

        def rank(key: tuple[str, ...]) -> tuple:
            layer, part = _layer_part(key[0])
            marked = max(bits_per_weight(tensors[n].dtype) for n in key) >= _HIGH_BITS
            edge = layer < MIXED_EDGE_LAYERS or layer >= self.num_layers - MIXED_EDGE_LAYERS
            order = self.FIT_PART_ORDER.index(part) if part in self.FIT_PART_ORDER else len(self.FIT_PART_ORDER)
            return (order > 1, not marked, not edge, order, min(layer, self.num_layers - 1 - layer), layer)

        return sorted((key for key, st in storages.items() if st.bits == 4), key=rank)

    def _group_storage(self, parts: list[Tensor]) -> Storage:
        if self.quant == "fit":
            return self._storage(parts, 4)
        return self._storage(parts, max(self._bits(t) for t in parts))

    def _storage(self, parts: list[Tensor], bits: int) -> Storage:
        """4-bit: blocks of 32 (``fit``: FIT_BLOCK_4BIT, FIT_ZERO_POINTS), Q4_0 copied bit for
        bit; 8-bit: blocks of 32 where every part is Q8_0 or Q4_0 (copied bit for bit), else as
        large as the width allows."""
        if bits == 4:
            if all(t.dtype == "Q4_0" for t in parts) or self.quant != "fit":
                return Storage(4, quantize.BLOCK)
            return Storage(4, FIT_BLOCK_4BIT, FIT_ZERO_POINTS)
        if all(t.dtype in quantize.EXACT for t in parts):
            return Storage(8, quantize.BLOCK)
        return Storage(8, quantize.block_for(parts[0].shape[1]))

    # ------------------------------------------------------------------ conversion

    def blocks(self, tensors: list[Tensor], is_output: bool = False) -> Blocks | None:
        """The stacked matrices in block layout, or None to store them as floats."""
        if not self.quantized:
            return None
        if is_output:
            storage = self._storage(tensors, self.OUTPUT_BITS)
        else:
            storage = self._plan.get(tuple(t.name for t in tensors)) or self._group_storage(tensors)
        return quantize.concat([self._one(t, storage) for t in tensors])

    def embedding(self, tensor: Tensor) -> Blocks | None:
        """8-bit blocks for GatherBlockQuantized on the CPU (a float table on CUDA or for float builds)."""
        if not self.quantized or self.device == "cuda" or tensor.shape[1] % quantize.BLOCK:
            return None
        return self._one(tensor, self._storage([tensor], self.OUTPUT_BITS))

    def _one(self, tensor: Tensor, storage: Storage) -> Blocks:
        """One matrix, converted ``quantize.ROW_CHUNK`` rows at a time, a chunk per core at
        once (numpy lets go of the GIL inside its loops: 1.8x on two cores)."""
        rows = tensor.shape[0]

        def chunk(start: int) -> Blocks:
            return self._rows(tensor, start, min(start + quantize.ROW_CHUNK, rows), storage)

        starts = range(0, rows, quantize.ROW_CHUNK)
        return quantize.concat(list(self._pool.map(chunk, starts)) if len(starts) > 1 else [chunk(0)])

    @staticmethod
    def _rows(tensor: Tensor, start: int, stop: int, storage: Storage) -> Blocks:
        exact = quantize.EXACT.get(tensor.dtype)
        if exact is not None and storage.block == quantize.BLOCK:
            blocks = exact(tensor.raw_rows(start, stop))
            if blocks.bits <= storage.bits:
                return quantize.to_8bit(blocks) if storage.bits == 8 else blocks
        quantizer = quantize.quantize_int4_zero_point if storage.zero_points else quantize.QUANTIZERS[storage.bits]
        return quantizer(tensor.float_rows(start, stop), storage.block)

    def _bits(self, tensor: Tensor) -> int:
        if self.quant == "int8" or bits_per_weight(tensor.dtype) >= _HIGH_BITS > self._file_bits:
            return 8
        if self.quant == "mixed":
            layer, part = _layer_part(tensor.name)
            inner = MIXED_EDGE_LAYERS <= layer < self.num_layers - MIXED_EDGE_LAYERS
            return 4 if inner and part in MIXED_4BIT_PARTS else 8
        return 4


def _layer_part(name: str) -> tuple[int, str]:
    """``layers.3.gate`` -> (3, "gate"); names outside the layers -> (-1, name)."""
    _, layer, part = (name.split(".") + ["", ""])[:3]
    return (int(layer), part) if layer.isdigit() else (-1, name)


def _shape(parts: list[Tensor]) -> tuple[int, int]:
    return sum(t.shape[0] for t in parts), parts[0].shape[1]


def quantized_file(source: TensorSource) -> bool:
    """A GGUF whose matrices are mostly block-quantized (not F16/BF16/F32)."""
    return source.kind == "gguf" and _dominant_bits(source) < 16


def _dominant_bits(source: TensorSource) -> float:
    """Bits per weight of the type holding most of the file's matrix bytes."""
    if source.kind != "gguf":
        return 16.0
    weights: Counter[str] = Counter()
    for name in ("q", "k", "v", "o", "gate", "up", "down"):
        tensor = source.get(f"layers.0.{name}")
        if tensor is not None:
            weights[tensor.dtype] += tensor.nbytes
    return bits_per_weight(weights.most_common(1)[0][0]) if weights else 16.0
