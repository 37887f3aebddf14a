"""The precision the user picks (``--quant``), turned into a decision per tensor.

| quant | CPU | CUDA | matrices | output matrix / embedding |
|---|---|---|---|---|
| auto | mixed under 0.5B parameters, int4 above | fp16 | | |
| int4 | yes | yes | 4-bit blocks of 32; Q4_0 copied exactly | 8-bit (as llama.cpp keeps it) |
| mixed | yes | yes | 4-bit ffn gate/up in all but the first and last two layers, 8-bit elsewhere | 8-bit |
| int8 | yes | yes | 8-bit blocks of 32; Q8_0 and Q4_0 copied exactly | 8-bit |
| fp16 | no (no fast fp16 kernels on the CPU) | yes | float16 | float16 |
| fp32 | yes | no (GroupQueryAttention on CUDA takes fp16) | float32 | float32 |

Under int4 a GGUF tensor the file stores with 6.5 or more bits per weight while most of
the file has fewer (Q6_K ``attn_v`` in a Q4_K_M file, a Q8_0 output matrix) keeps 8 bits:
the file's author spent bits there on purpose, and llama.cpp's own mixes do the same.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

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
#: (1.17x), int8 19.06, mixed 19.65 (1.03x) at 1.1x int8's decode speed. At 1B, 8-bit tensors
#: cost a lone stream more (int8 decodes 28% slower than int4: 22.8 vs 31.5 tok/s, reading
#: twice the bytes per token), so larger models stay int4.
MIXED_AUTO_MAX_PARAMETERS = 500_000_000
#: ``mixed``: the layer parts kept in 4 bits, and how many layers at each end keep 8 bits
#: everywhere (the first and last layers are the most sensitive to rounding, as in
#: llama.cpp's own mixes). Each 4-bit tensor alone costs little perplexity; 4-bit attention
#: or ffn_down cost more than they save (gate/up/down 4-bit: 19.94; all 4-bit: 22.34).
MIXED_4BIT_PARTS = frozenset({"gate", "up", "gate_up"})
MIXED_EDGE_LAYERS = 2


def resolve_quant(quant: str, device: str, parameters: int | None = None) -> str:
    """``auto`` -> fp16 on CUDA; on the CPU mixed for models under
    :data:`MIXED_AUTO_MAX_PARAMETERS`, int4 above or when the size is unknown (models the
    importer cannot read go to the builder, whose CPU build is int4). Combinations that
    cannot run are refused."""
    quant = (quant or "auto").lower()
    if quant not in QUANTS:
        raise SourceError(f"unknown quant {quant!r}: pick one of {', '.join(QUANTS)}")
    if quant == "auto":
        if device == "cuda":
            return "fp16"
        return "mixed" if parameters is not None and parameters < MIXED_AUTO_MAX_PARAMETERS else "int4"
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
    """Decides, tensor by tensor, how a matrix is stored in the graph."""

    #: The output matrix (and the embedding it may share) in quantized builds.
    OUTPUT_BITS = 8

    def __init__(self, quant: str, device: str, source: TensorSource) -> None:
        self.quant = resolve_quant(quant, device, source.config.parameters)
        self.device = device
        self.float_type = np.dtype(np.float16 if device == "cuda" else np.float32)
        self.quantized = self.quant in ("int4", "int8", "mixed")
        self.num_layers = source.config.num_layers
        self._dominant_bits = _dominant_bits(source)
        self._pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="quantize")

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)

    def blocks(self, tensors: list[Tensor], is_output: bool = False) -> Blocks | None:
        """The stacked matrices in block layout, or None to store them as floats."""
        if not self.quantized:
            return None
        return quantize.concat([self._one(t, self.OUTPUT_BITS if is_output else None) for t in tensors])

    def embedding(self, tensor: Tensor) -> Blocks | None:
        """8-bit blocks for GatherBlockQuantized on the CPU (a float table on CUDA or for float builds)."""
        if not self.quantized or self.device == "cuda" or tensor.shape[1] % quantize.BLOCK:
            return None
        return self._one(tensor, self.OUTPUT_BITS)

    def _one(self, tensor: Tensor, bits: int | None) -> Blocks:
        """One matrix, converted ``quantize.ROW_CHUNK`` rows at a time, a chunk per core at
        once (numpy lets go of the GIL inside its loops: 1.8x on two cores)."""
        if bits is None:
            bits = self._bits(tensor)
        rows = tensor.shape[0]

        def chunk(start: int) -> Blocks:
            return self._rows(tensor, start, min(start + quantize.ROW_CHUNK, rows), bits)

        starts = range(0, rows, quantize.ROW_CHUNK)
        return quantize.concat(list(self._pool.map(chunk, starts)) if len(starts) > 1 else [chunk(0)])

    @staticmethod
    def _rows(tensor: Tensor, start: int, stop: int, bits: int) -> Blocks:
        exact = quantize.EXACT.get(tensor.dtype)
        if exact is not None:
            blocks = exact(tensor.raw_rows(start, stop))
            if blocks.bits <= bits:
                return quantize.to_8bit(blocks) if bits == 8 else blocks
        return quantize.QUANTIZERS[bits](tensor.float_rows(start, stop))

    def _bits(self, tensor: Tensor) -> int:
        if self.quant == "int8" or bits_per_weight(tensor.dtype) >= _HIGH_BITS > self._dominant_bits:
            return 8
        if self.quant == "mixed":
            _, layer, part = (tensor.name.split(".") + ["", ""])[:3]
            inner = layer.isdigit() and MIXED_EDGE_LAYERS <= int(layer) < self.num_layers - MIXED_EDGE_LAYERS
            return 4 if inner and part in MIXED_4BIT_PARTS else 8
        return 4


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
