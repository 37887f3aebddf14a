"""Weights in ONNX Runtime's block-quantized layout (MatMulNBits / GatherBlockQuantized).

The layout: a weight [N, K] (a Linear's [out, in]) is cut along K into blocks (32 values
unless a storage plan picks larger ones); each block stores ``bits``-wide unsigned codes
``u`` with one scale ``s`` and one zero point ``z``, and means ``s * (u - z)``. Four-bit codes
pack two to a byte, the even element in the low nibble. Zero points equal to the middle code
(8 or 128) are the operators' default and are not stored.

Two GGUF block types are this layout already and are copied without a second rounding:
Q4_0 (``d * (q - 8)``, 4-bit codes in blocks of 32: z = 8) and Q8_0 (``d * q``, signed
8-bit: u = q + 128, z = 128). A Q4_0 block is also exactly an 8-bit block (u = q + 120),
so a fused matrix whose parts mix the two goes 8-bit without loss. Everything else is
de-quantized a few rows at a time and quantized here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32
#: Block sizes a plan may pick for codes quantized here: a fp32 scale per 64 values costs 0.5
#: bits per weight where one per 32 costs 1. MatMulNBits takes powers of two from 16, but with
#: blocks of 128 its CPU kernel sums a batch of rows in another order than a lone row (1e-7
#: apart, which the int8 rounding of activations grows to 1e-2 in the logits over a few hundred
#: steps), so a sequence would decode differently batched and alone; 32 and 64 agree exactly.
BLOCK_SIZES = (32, 64)
#: Rows quantized per chunk: bounds the float32 working set to ROW_CHUNK x K values.
ROW_CHUNK = 1024
#: Candidate divisors for the symmetric int4 scale search (amax / divisor); 8 is plain
#: round-to-nearest with the largest magnitude on the -8 end, as llama.cpp's Q4_0 does.
INT4_DIVISORS = (-8.0, 7.0, 7.5, -7.5, 7.25, -7.75, 6.75)


@dataclass
class Blocks:
    """One matrix in block layout: ``codes`` [N, K/block, block*bits/8] uint8, ``scales`` and
    ``zero_points`` [N, K/block] (float32 and uint8; zero points unpacked)."""

    bits: int
    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.codes.shape[0])

    @property
    def block_size(self) -> int:
        return int(self.codes.shape[2]) * 8 // self.bits

    @property
    def nbytes(self) -> int:
        """Bytes stored: codes, fp32 scales, and zero points unless symmetric (4-bit ones packed)."""
        zero_points = 0 if self.symmetric else self.packed_zero_points().nbytes
        return self.codes.nbytes + self.scales.size * 4 + zero_points

    @property
    def symmetric(self) -> bool:
        """Every zero point is the middle code (8 or 128), MatMulNBits' default."""
        return bool((self.zero_points == 1 << (self.bits - 1)).all())

    def packed_zero_points(self) -> np.ndarray:
        """MatMulNBits' zero point input: 4-bit ones two to a byte, [N, ceil(blocks/2)]."""
        if self.bits == 8:
            return self.zero_points
        zp = self.zero_points
        if zp.shape[1] % 2:
            zp = np.concatenate([zp, np.zeros((zp.shape[0], 1), np.uint8)], axis=1)
        return _pack4(zp)

    def dequantize(self) -> np.ndarray:
        """Back to float32 [N, K] (tests and quality checks)."""
        codes = _unpack4(self.codes) if self.bits == 4 else self.codes
        values = codes.astype(np.float32) - self.zero_points[..., None]
        return (values * self.scales[..., None]).reshape(self.rows, -1)


def concat(parts: list[Blocks]) -> Blocks:
    """Stack matrices along N (fused QKV, gate+up); all parts go to the widest bits. The
    parts share one block size (the precision plans a fused matrix as one)."""
    if len({p.block_size for p in parts}) > 1:
        raise ValueError(f"fused parts in different block sizes: {sorted({p.block_size for p in parts})}")
    bits = max(p.bits for p in parts)
    parts = [to_8bit(p) if p.bits != bits else p for p in parts]
    if len(parts) == 1:
        return parts[0]
    return Blocks(bits, np.concatenate([p.codes for p in parts]),
                  np.concatenate([p.scales for p in parts]), np.concatenate([p.zero_points for p in parts]))


def to_8bit(blocks: Blocks) -> Blocks:
    """A 4-bit matrix as 8-bit codes with the same values (u8 = u4 - z4 + 128)."""
    if blocks.bits == 8:
        return blocks
    codes = _unpack4(blocks.codes).astype(np.int16) - blocks.zero_points[..., None] + 128
    return Blocks(8, codes.astype(np.uint8), blocks.scales, np.full_like(blocks.zero_points, 128))


def _unpack4(codes: np.ndarray) -> np.ndarray:
    out = np.empty(codes.shape[:-1] + (codes.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = codes & 0x0F
    out[..., 1::2] = codes >> 4
    return out


def _pack4(codes: np.ndarray) -> np.ndarray:
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


# --------------------------------------------------------------------------- exact GGUF blocks


def _gguf_blocks(raw: np.ndarray, block_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of GGUF blocks that start with an fp16 scale: the blocks [rows, n, bytes] and the scales."""
    blocks = raw.reshape(raw.shape[0], -1, block_bytes)
    return blocks, blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)


def from_q4_0(raw: np.ndarray) -> Blocks:
    """GGUF Q4_0 rows (each block: fp16 d, then 16 bytes holding elements 0-15 in the low
    nibbles and 16-31 in the high ones) as 4-bit blocks, bit for bit."""
    blocks, scales = _gguf_blocks(raw, 18)
    quads = blocks[..., 2:]
    codes = np.concatenate([quads & 0x0F, quads >> 4], axis=-1)  # element order 0..31
    return Blocks(4, _pack4(codes), scales, np.full(scales.shape, 8, np.uint8))


def from_q8_0(raw: np.ndarray) -> Blocks:
    """GGUF Q8_0 rows (each block: fp16 d, then 32 signed bytes) as 8-bit blocks, bit for bit."""
    blocks, scales = _gguf_blocks(raw, 34)
    codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return Blocks(8, codes, scales, np.full(scales.shape, 128, np.uint8))


EXACT = {"Q4_0": from_q4_0, "Q8_0": from_q8_0}


# --------------------------------------------------------------------------- from float


def _blocked(weights: np.ndarray, block: int) -> np.ndarray:
    """[N, K] float -> [N, K/block, block], zero-padding K to a whole block."""
    rows, cols = weights.shape
    pad = (-cols) % block
    if pad:
        weights = np.concatenate([weights, np.zeros((rows, pad), weights.dtype)], axis=1)
    return weights.reshape(rows, -1, block)


def block_for(cols: int, largest: int = BLOCK_SIZES[-1]) -> int:
    """The largest block size in :data:`BLOCK_SIZES` up to ``largest`` that divides ``cols``
    (32 when none does: the last block is then zero-padded)."""
    return max((b for b in BLOCK_SIZES if b <= largest and cols % b == 0), default=BLOCK)


def quantize_int8(weights: np.ndarray, block: int = BLOCK) -> Blocks:
    """Symmetric 8-bit, round to nearest (8 bits leave nothing worth searching for)."""
    blocks = _blocked(np.asarray(weights, np.float32), block)
    amax = np.abs(blocks).max(axis=-1)
    scales = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    codes = np.clip(np.rint(blocks / scales[..., None]), -127, 127) + 128
    return Blocks(8, codes.astype(np.uint8), scales, np.full(scales.shape, 128, np.uint8))


def quantize_int4(weights: np.ndarray, block: int = BLOCK) -> Blocks:
    """Symmetric 4-bit (codes -8..7 around zero point 8) with a small scale search per block.

    Each block tries a few scales around its largest magnitude (``INT4_DIVISORS``) and
    keeps the one with the least squared error: a calibration-free search in the spirit of
    llama.cpp's k-quants, cheap enough to run on every block of a large model.
    """
    blocks = _blocked(np.asarray(weights, np.float32), block)
    signed_max = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    best_err = np.full(signed_max.shape, np.inf, np.float32)
    best_scale = np.zeros(signed_max.shape, np.float32)
    for divisor in INT4_DIVISORS:
        scale = signed_max / divisor if divisor < 0 else np.abs(signed_max) / divisor
        safe = np.where(scale != 0, scale, 1.0).astype(np.float32)
        codes = np.clip(np.rint(blocks / safe[..., None]), -8, 7)
        err = np.square(codes * safe[..., None] - blocks).sum(axis=-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, safe, best_scale)
    codes = (np.clip(np.rint(blocks / best_scale[..., None]), -8, 7) + 8).astype(np.uint8)
    return Blocks(4, _pack4(codes), best_scale, np.full(best_scale.shape, 8, np.uint8))


#: Shares of a block's range tried by :func:`quantize_int4_zero_point` (the whole range,
#: then clipping the outermost values a little for finer steps in between).
INT4_RANGE_SHARES = (1.0, 0.95, 0.9, 0.85)


def quantize_int4_zero_point(weights: np.ndarray, block: int = BLOCK) -> Blocks:
    """4-bit codes 0..15 with a whole-number zero point per block (``s * (u - z)``).

    A block's values are rarely centred on zero, so a zero point uses all 16 levels where the
    symmetric layout wastes some: 26% less squared error than :func:`quantize_int4` on the
    default model's matrices (from its Q5_0 and Q4_1 tensors) for 1/8 bit more per weight;
    blocks of 64 with zero points come as close as symmetric blocks of 32 at 4.56 bits instead
    of 5. Per block: a few shares of the range (:data:`INT4_RANGE_SHARES`), each refined twice
    by least squares (the line ``a*q + b`` through the codes gives the zero point ``-b/a``,
    then the scale for that zero point, both from the same sums), keeping the least squared
    error. About as fast as the symmetric search (both ~0.1 s per 1024 x 3072 rows).
    """
    blocks = _blocked(np.asarray(weights, np.float32), block)
    low, high = blocks.min(axis=-1), blocks.max(axis=-1)
    count = np.float32(block)
    sum_w, sum_ww = blocks.sum(axis=-1), np.einsum("...i,...i->...", blocks, blocks)
    tiny = np.float32(1e-12)
    best_err = np.full(low.shape, np.inf, np.float32)
    best_scale = np.ones(low.shape, np.float32)
    best_zero = np.zeros(low.shape, np.float32)
    for share in INT4_RANGE_SHARES:
        middle, half = (high + low) / 2, (high - low) / 2 * share
        scale = np.maximum(2 * half / 15, tiny)
        zero = np.clip(np.rint((half - middle) / scale), 0, 15)
        for _ in range(2):
            codes = blocks / scale[..., None]
            codes += zero[..., None]
            np.rint(codes, out=codes)
            np.clip(codes, 0, 15, out=codes)
            sum_q = codes.sum(axis=-1)
            sum_qq = np.einsum("...i,...i->...", codes, codes)
            sum_qw = np.einsum("...i,...i->...", codes, blocks)
            # The least-squares line w ~ slope * q + intercept through these codes...
            det = count * sum_qq - sum_q * sum_q
            ok = det > 0
            slope = np.where(ok, (count * sum_qw - sum_q * sum_w) / np.where(ok, det, 1), scale)
            slope = np.where(slope > tiny, slope, scale)
            intercept = np.where(ok, (sum_w - slope * sum_q) / count, -scale * zero)
            zero = np.clip(np.rint(-intercept / slope), 0, 15)
            # ...then the best scale for its whole-number zero point, from the same sums.
            cross = sum_qw - zero * sum_w
            square = sum_qq - 2 * zero * sum_q + count * zero * zero
            fitted = cross / np.maximum(square, tiny)
            scale = np.where(fitted > tiny, fitted, slope).astype(np.float32)
        err = scale * scale * square - 2 * scale * cross + sum_ww  # of these codes at this scale
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
    codes = blocks / best_scale[..., None]
    codes += best_zero[..., None]
    np.rint(codes, out=codes)
    np.clip(codes, 0, 15, out=codes)
    return Blocks(4, _pack4(codes.astype(np.uint8)), best_scale.astype(np.float32), best_zero.astype(np.uint8))


QUANTIZERS = {4: quantize_int4, 8: quantize_int8}
