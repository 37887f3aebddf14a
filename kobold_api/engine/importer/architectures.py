"""One importer class per architecture family, registered by the names GGUF files and
Hugging Face configs use, each writing the same fused graph the engine runs:
GroupQueryAttention (rotary inside, KV cache in place), MatMulNBits for block-quantized
weights, SkipSimplifiedLayerNormalization joining each residual add to the next norm,
and logits for the last position only.

Graph interface (the manifest repeats it): inputs ``input_ids`` [batch, seq] and
``attention_mask`` [batch, total] (int64), ``past_key_values.{i}.key/value``
[batch, kv_heads, past, head_dim]; outputs ``logits`` [batch, 1, vocab] (float32) and
``present.{i}.key/value``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import numpy as np
from onnx import TensorProto

from .onnx_writer import MS, GraphWriter
from .precision import Precision
from .sources import ModelConfig, TensorSource, UnsupportedArchitecture

#: Called after each tensor written: (tensors done, tensors in all, bytes written).
Tick = Callable[[int, int, int], None]

REGISTRY: dict[str, type["DecoderImporter"]] = {}


def register(cls: type["DecoderImporter"]) -> type["DecoderImporter"]:
    for name in cls.architectures:
        REGISTRY[name] = cls
    return cls


def importer_for(config: ModelConfig) -> type["DecoderImporter"]:
    """The class for ``config.architecture``, or a SourceError naming what we cannot build
    (checked before any long work)."""
    cls = REGISTRY.get(config.architecture)
    if cls is None:
        raise UnsupportedArchitecture(
            f"architecture {config.architecture!r} cannot be imported yet "
            f"(supported: {', '.join(sorted(REGISTRY))})"
        )
    rope_scaling_kind(config)
    return cls


#: Rotary scalings the caches below implement ("dynamic" NTK equals the plain rotary within
#: the trained context, which is all we serve; so does LongRoPE with its short factors, and
#: its sources cap the context at the trained window).
_ROPE_SCALINGS = ("default", "none", "dynamic", "linear", "llama3", "longrope")


def rope_scaling_kind(config: ModelConfig) -> str:
    kind = str(config.rope_scaling.get("rope_type", "default")) if config.rope_scaling else "default"
    if kind not in _ROPE_SCALINGS:
        raise UnsupportedArchitecture(
            f"rope scaling {kind!r} is not supported yet (supported: {', '.join(_ROPE_SCALINGS)})")
    return kind


class DecoderImporter:
    """A pre-norm decoder with SwiGLU MLP and rotary attention (the Llama family)."""

    architectures: tuple[str, ...] = ()
    version = 1
    #: llama.cpp's converter reorders the query/key rows of these families so that rotary
    #: pairs are adjacent (its "normal" rope); Hugging Face folders keep the halves layout.
    gguf_rotary_interleaved = False
    #: The per-layer tensors this family reads (see ``sources.LAYER_PARTS``).
    layer_parts: tuple[str, ...] = ("attn_norm", "q", "k", "v", "o", "q_bias", "k_bias", "v_bias",
                                    "ffn_norm", "gate", "up", "down")
    #: Added to RMS-norm weights read from a Hugging Face folder (Gemma stores ``w`` and
    #: multiplies by ``1 + w``; llama.cpp's converter writes ``1 + w`` into the GGUF).
    hf_norm_offset = 0.0
    #: The gated MLP's activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU).
    activation = "silu"

    def __init__(self, source: TensorSource, precision: Precision, writer: GraphWriter, tick: Tick) -> None:
        self.source, self.precision, self.w, self.tick = source, precision, writer, tick
        self.c = source.config
        self._done = 0
        self._total = self.count_tensors()
        #: The rotary frequencies (scaling applied) of each cos/sin table written, by table name,
        #: and the table each layer's keys were rotated with: the runtime needs both to move
        #: cached keys to new positions (context shifting).
        self.inv_freqs: dict[str, list[float]] = {}
        self.layer_tables: list[str] = []

    # ------------------------------------------------------------------ helpers

    def matrix_groups(self) -> list[list[str]]:
        """The matrices each layer MatMul reads, fused ones together (for the precision's plan)."""
        groups = []
        for i in range(self.c.num_layers):
            p = f"layers.{i}"
            groups += [self.qkv_names(i), [f"{p}.o"], *self.gate_up_names(i), [f"{p}.down"]]
        return groups

    def table_bytes(self) -> int:
        """Bytes of the rotary cos/sin tables the graph stores (one pair, two with local rotary)."""
        c = self.c
        pairs = 1 + (c.rope_local_theta is not None)
        return pairs * 2 * c.context_length * ((c.rotary_dim or c.head_dim) // 2) * self.w.float_type.itemsize

    def count_tensors(self) -> int:
        layers = sum(self.source.get(f"layers.0.{p}") is not None for p in self.layer_parts) * self.c.num_layers
        return layers + 3  # embedding, final norm, output matrix (shared or not)

    def _advance(self, count: int = 1) -> None:
        self._done += count
        self.tick(self._done, self._total, self.w.bytes_written)

    def vector(self, name: str) -> str:
        """A norm weight or bias as a graph initializer in the graph's float type."""
        values = self.source.require(name).to_float()
        if self.hf_norm_offset and self.source.kind == "hf_dir" and "norm" in name:
            values = values + np.float32(self.hf_norm_offset)
        self._advance()
        return self.w.float_weight(name, values)

    def linear(self, x: str, names: list[str], node: str, bias: list[str] | None = None,
               output: str | None = None) -> str:
        """``x`` times the matrices ``names`` stacked along their rows (one fused MatMul)."""
        tensors = [self.source.require(n) for n in names]
        k = tensors[0].shape[1]
        bias_name = ""
        if bias and all(self.source.get(b) is not None for b in bias):
            bias_values = np.concatenate([self.source.require(b).to_float() for b in bias])
            bias_name = self.w.float_weight(f"{node}.bias", bias_values)
            self._advance(len(bias))
        blocks = self.precision.blocks(tensors, is_output=node == "lm_head")
        self._advance(len(names))
        if blocks is None:
            weight = np.concatenate([t.float_rows(0, t.shape[0]) for t in tensors])
            return self.w.matmul_float(x, weight, node, bias_name, output)
        return self.w.matmul_nbits(x, blocks, node, k, bias_name, output)

    def rotary_caches(self, theta: float | None = None, scaled: bool = True, suffix: str = "") -> tuple[str, str]:
        """cos/sin tables [positions, rotary_dim/2] for GroupQueryAttention (base ``theta``,
        the model's own by default; ``scaled=False`` leaves out its rotary scaling)."""
        c = self.c
        dim = c.rotary_dim or c.head_dim
        inv_freq = 1.0 / ((theta or c.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        scaling = c.rope_scaling
        kind = rope_scaling_kind(c) if scaled else "default"
        freqs = self.source.get("rope_freqs") if scaled else None
        magnitude = 1.0
        if freqs is not None:  # llama.cpp stores Llama 3's frequency factors as a tensor
            inv_freq = inv_freq / freqs.to_float().astype(np.float64)
        elif kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif kind == "linear":
            inv_freq = inv_freq / float(scaling.get("factor", 1.0))
        elif kind == "longrope":
            inv_freq, magnitude = self._longrope_short(inv_freq, scaling)
        positions = np.arange(c.context_length, dtype=np.float64)
        angles = np.outer(positions, inv_freq)
        cos = self.w.float_weight(f"cos_cache{suffix}", np.cos(angles) * magnitude)
        self.inv_freqs[cos] = [float(f) for f in inv_freq]
        return cos, self.w.float_weight(f"sin_cache{suffix}", np.sin(angles) * magnitude)

    def _longrope_short(self, inv_freq: np.ndarray, scaling: dict) -> tuple[np.ndarray, float]:
        """Phi-3's LongRoPE within the trained window: frequencies divided by the short
        factors, cos/sin scaled by the attention factor (given, or from the extension ratio)."""
        stored = self.source.get("rope_factors_short")
        factors = stored.to_float() if stored is not None else scaling.get("short_factor")
        if factors is None or len(factors) != len(inv_freq):
            raise UnsupportedArchitecture("LongRoPE without short factors for every rotary frequency")
        magnitude = scaling.get("attention_factor")
        if magnitude is None:
            factor = float(scaling.get("factor", 1.0))
            original = float(scaling.get("original_max_position_embeddings") or self.c.context_length)
            magnitude = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1.0 else 1.0
        return inv_freq / np.asarray(factors, np.float64), float(magnitude)

    # ------------------------------------------------------------------ graph

    def build(self) -> None:
        c, w = self.c, self.w
        fp = w.onnx_float
        w.graph_input("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
        w.graph_input("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])
        for i in range(c.num_layers):
            for kind in ("key", "value"):
                w.graph_input(f"past_key_values.{i}.{kind}", fp,
                              ["batch_size", c.num_kv_heads, "past_sequence_length", c.head_dim])
        one = w.constant("const/one", [1])
        mask_sum = w.op("ReduceSum", ["attention_mask", one], "mask/sum", keepdims=1)
        seqlens = w.op("Cast", [w.op("Sub", [mask_sum, one], "mask/sub")], "mask/seqlens", to=TensorProto.INT32)
        total = w.op("Gather", [w.op("Shape", ["attention_mask"], "mask/shape"), w.constant("const/one_scalar", 1)],
                     "mask/total", axis=0)
        total = w.op("Cast", [total], "mask/total_int32", to=TensorProto.INT32)
        self.seqlens, self.total = seqlens, total
        self._rotary: dict[str, tuple[str, str]] = {}

        hidden = self.embeddings()
        residual, normed = hidden, None
        for i in range(c.num_layers):
            residual, normed = self.layer(i, residual, normed)
            self.source.drop_pages()
        logits = self.head(residual, normed)
        if w.float_type != np.float32:
            logits = w.op("Cast", [logits], "logits/cast", to=TensorProto.FLOAT)
        w.nodes[-1].output[0] = "logits"
        w.graph_output("logits", TensorProto.FLOAT, ["batch_size", "one", c.vocab_size])
        for i in range(c.num_layers):
            for kind in ("key", "value"):
                w.graph_output(f"present.{i}.{kind}", fp,
                               ["batch_size", c.num_kv_heads, "total_sequence_length", c.head_dim])

    def embeddings(self) -> str:
        c, w = self.c, self.w
        embed = self.source.require("embed")
        gathered = self.precision.embedding(embed)
        if gathered is None:
            table = w.float_weight("embed.weight", embed.float_rows(0, embed.shape[0]))
            out = w.op("Gather", [table, "input_ids"], "embed", axis=0)
        else:
            self.shared_embedding = gathered
            # Stored as MatMulNBits wants it ([rows, blocks, bytes]) so a tied output matrix can
            # read the same codes; the gather sees them as [rows, hidden].
            codes = w.op("Reshape", [w.weight("embed.codes", gathered.codes),
                                     w.constant("embed/shape", [gathered.rows, -1])], "embed/codes2d")
            scales = w.float_weight("embed.scales", gathered.scales)
            zero_points = "" if gathered.symmetric else w.weight("embed.zp", gathered.zero_points)
            out = w.op("GatherBlockQuantized", [codes, "input_ids", scales] + ([zero_points] if zero_points else []),
                       "embed", domain=MS, bits=gathered.bits, block_size=gathered.block_size)
        self._advance()
        if c.embedding_multiplier != 1.0:
            out = w.op("Mul", [out, w.float_weight("embed.multiplier", np.array(c.embedding_multiplier))],
                       "embed/scale")
        return out

    def norm(self, residual: str, added: str | None, weight_name: str, node: str) -> tuple[str, str]:
        """RMS-normalize ``residual + added`` (or ``residual`` alone); return (sum, normed)."""
        if added is None:
            return residual, self.rms_norm(residual, weight_name)
        weight = self.vector(weight_name)
        if self.c.residual_multiplier != 1.0:
            added = self.w.op("Mul", [added, self.w.constant(f"{node}/res_scale",
                                                             np.array(self.c.residual_multiplier, self.w.float_type),
                                                             self.w.float_type)], f"{node}/res_mul")
        outs = self.w.node("SkipSimplifiedLayerNormalization", [residual, added, weight], node,
                           [f"{node}/out", "", "", f"{node}/sum"], domain=MS, epsilon=self.c.rms_eps)
        return outs[3], outs[0]

    def layer(self, i: int, residual: str, pending: str | None) -> tuple[str, str]:
        """One decoder layer; ``pending`` is the previous layer's MLP output, not yet added."""
        p = f"layers.{i}"
        residual, normed = self.norm(residual, pending, f"{p}.attn_norm", f"{p}/attn_norm")
        attention = self.attention(i, normed)
        residual, normed = self.norm(residual, attention, f"{p}.ffn_norm", f"{p}/ffn_norm")
        return residual, self.mlp(i, normed)

    def attention(self, i: int, x: str) -> str:
        c, w, p = self.c, self.w, f"layers.{i}"
        qkv = self.linear(x, self.qkv_names(i), f"{p}/qkv", bias=[f"{p}.q_bias", f"{p}.k_bias", f"{p}.v_bias"])
        q, k, v = self.split_qkv(i, qkv)
        scale = c.attention_scale if c.attention_scale is not None else 1.0 / math.sqrt(c.head_dim)
        interleaved = int(self.source.kind == "gguf" and self.gguf_rotary_interleaved)
        cos, sin = self.layer_rotary(i)
        self.layer_tables.append(cos)
        # Both count the query's own position in the window (checked against transformers).
        window = c.sliding_window if c.slides(i) else -1
        out = w.node("GroupQueryAttention",
                     [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", self.seqlens, self.total,
                      cos, sin],
                     f"{p}/attention", [f"{p}/attention/out", f"present.{i}.key", f"present.{i}.value"],
                     domain=MS, num_heads=c.num_heads, kv_num_heads=c.num_kv_heads, scale=float(scale),
                     do_rotary=1, rotary_interleaved=interleaved, local_window_size=window,
                     softcap=float(c.attention_softcap))[0]
        return self.linear(out, [f"{p}.o"], f"{p}/o")

    def rotary_contract(self) -> dict:
        """How the cached keys were rotated (after :meth:`build`): what the runtime needs to move
        them by ``d`` positions, a rotation by ``d`` times each pair's frequency (the tables'
        magnitude, LongRoPE's attention factor, is already in the keys and does not change)."""
        c = self.c
        return {"dim": c.rotary_dim or c.head_dim,
                "interleaved": bool(self.source.kind == "gguf" and self.gguf_rotary_interleaved),
                "inv_freq": self.inv_freqs, "layers": self.layer_tables}

    def qkv_names(self, i: int) -> list[str]:
        """The matrices stacked into the fused query/key/value projection."""
        return [f"layers.{i}.q", f"layers.{i}.k", f"layers.{i}.v"]

    def layer_rotary(self, i: int) -> tuple[str, str]:
        """The cos/sin tables layer ``i`` rotates with (written when first used)."""
        if "global" not in self._rotary:
            self._rotary["global"] = self.rotary_caches()
        return self._rotary["global"]

    def split_qkv(self, i: int, qkv: str) -> tuple[str, str, str]:
        """Packed QKV goes to GroupQueryAttention as one input (key and value left empty)."""
        return qkv, "", ""

    def split_packed(self, i: int, qkv: str) -> tuple[str, str, str]:
        """The packed projection cut into queries, keys and values (for families that
        transform them before attention)."""
        c, w, p = self.c, self.w, f"layers.{i}"
        sizes = [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
        q, k, v = w.node("Split", [qkv, w.constant(f"{p}/qkv_sizes", sizes)], f"{p}/qkv_split", 3, axis=-1)
        return q, k, v

    def rms_norm(self, x: str, weight_name: str) -> str:
        """RMS norm over the last axis with the stored weight ``weight_name``."""
        return self.w.op("SimplifiedLayerNormalization", [x, self.vector(weight_name)],
                         weight_name.replace(".", "/"), epsilon=self.c.rms_eps, axis=-1, stash_type=1)

    def mlp(self, i: int, x: str) -> str:
        w, p = self.w, f"layers.{i}"
        gate, up = self.gate_and_up(i, x)
        if self.activation == "gelu_tanh":
            activated = w.op("FastGelu", [gate], f"{p}/gelu", domain=MS)
        else:
            activated = w.op("Mul", [gate, w.op("Sigmoid", [gate], f"{p}/silu/sigmoid")], f"{p}/silu")
        return self.linear(w.op("Mul", [activated, up], f"{p}/gated"), [f"{p}.down"], f"{p}/down")

    def gate_up_names(self, i: int) -> list[list[str]]:
        """The matrices of the MLP's input projections, one list per MatMul."""
        return [[f"layers.{i}.gate"], [f"layers.{i}.up"]]

    def gate_and_up(self, i: int, x: str) -> tuple[str, str]:
        p = f"layers.{i}"
        return self.linear(x, [f"{p}.gate"], f"{p}/gate"), self.linear(x, [f"{p}.up"], f"{p}/up")

    def head(self, residual: str, pending: str) -> str:
        c, w = self.c, self.w
        _, normed = self.norm(residual, pending, "final_norm", "final_norm")
        starts, ends, axes = (w.constant("last/starts", [-1]), w.constant("last/ends", [2**62]),
                              w.constant("last/axes", [1]))
        last = w.op("Slice", [normed, starts, ends, axes], "last_position_slice")
        shared = getattr(self, "shared_embedding", None)
        if c.tied_embeddings and shared is not None:
            # The output matrix is the embedding: MatMulNBits reads the same stored codes.
            self._advance()
            inputs = [last, "embed.codes", "embed.scales"] + ([] if shared.symmetric else ["embed.zp"])
            logits = w.node("MatMulNBits", inputs, "lm_head", domain=MS, K=c.hidden_size, N=shared.rows,
                            bits=shared.bits, block_size=shared.block_size, accuracy_level=w.accuracy_level)[0]
        else:
            logits = self.linear(last, ["embed" if c.tied_embeddings else "lm_head"], "lm_head")
        if c.logits_scaling != 1.0:
            logits = w.op("Mul", [logits, w.float_weight("logits.scale", np.array(1.0 / c.logits_scaling))],
                          "logits/scale")
        if c.final_softcap:
            capped = w.op("Tanh", [w.op("Mul", [logits, w.float_weight("logits.softcap_in", np.array(
                1.0 / c.final_softcap))], "logits/softcap_in")], "logits/tanh")
            logits = w.op("Mul", [capped, w.float_weight("logits.softcap", np.array(c.final_softcap))],
                          "logits/softcap")
        return logits


def _llama3_inv_freq(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    """Llama 3.1's frequency-dependent rotary scaling (long wavelengths slowed by ``factor``)."""
    factor = float(scaling.get("factor", 8.0))
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    wavelength = 2 * math.pi / inv_freq
    smooth = (original / wavelength - low) / (high - low)
    scaled = np.where(wavelength > original / low, inv_freq / factor, inv_freq)
    middle = (wavelength <= original / low) & (wavelength >= original / high)
    return np.where(middle, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


@register
class LlamaImporter(DecoderImporter):
    """Llama 1/2/3, Mistral and Mixtral-free Mistral-Nemo, SmolLM and the many Llama-shaped models."""

    architectures = ("llama",)
    gguf_rotary_interleaved = True


@register
class GraniteImporter(LlamaImporter):
    """IBM Granite 3: Llama with embedding, residual, attention and logits multipliers."""

    architectures = ("granite",)


@register
class Qwen2Importer(DecoderImporter):
    """Qwen 2 / 2.5: biases on the query, key and value projections."""

    architectures = ("qwen2",)


class PerHeadNorms:
    """For families with an RMS norm over each head of the queries and keys, before the rotary."""

    def split_qkv(self, i: int, qkv: str) -> tuple[str, str, str]:
        q, k, v = self.split_packed(i, qkv)
        return self.head_norm(q, f"layers.{i}.q_norm", self.c.num_heads), \
            self.head_norm(k, f"layers.{i}.k_norm", self.c.num_kv_heads), v

    def head_norm(self, x: str, weight_name: str, heads: int) -> str:
        w = self.w
        node = weight_name.replace(".", "/")
        split = w.op("Reshape", [x, w.constant(f"{node}/heads", [0, 0, heads, self.c.head_dim])], f"{node}/split")
        normed = self.rms_norm(split, weight_name)
        return w.op("Reshape", [normed, w.constant(f"{node}/merge", [0, 0, heads * self.c.head_dim])],
                    f"{node}/merged")


@register
class Qwen3Importer(PerHeadNorms, DecoderImporter):
    """Qwen 3: Qwen 2 without biases, with per-head query/key norms."""

    architectures = ("qwen3",)
    layer_parts = DecoderImporter.layer_parts + ("q_norm", "k_norm")


@register
class Olmo2Importer(DecoderImporter):
    """OLMo 2: RMS norms on the attention and MLP outputs (not their inputs), and on the whole
    query and key projections before the rotary."""

    architectures = ("olmo2",)
    layer_parts = ("q", "k", "v", "o", "q_norm", "k_norm", "post_attn_norm", "gate", "up", "down", "post_ffn_norm")

    def layer(self, i: int, residual: str, pending: str | None) -> tuple[str, str]:
        w, p = self.w, f"layers.{i}"
        if pending is not None:
            residual = w.op("Add", [residual, pending], f"{p}/mlp_residual")
        attention = self.rms_norm(self.attention(i, residual), f"{p}.post_attn_norm")
        residual = w.op("Add", [residual, attention], f"{p}/attn_residual")
        return residual, self.rms_norm(self.mlp(i, residual), f"{p}.post_ffn_norm")

    def split_qkv(self, i: int, qkv: str) -> tuple[str, str, str]:
        q, k, v = self.split_packed(i, qkv)
        return self.rms_norm(q, f"layers.{i}.q_norm"), self.rms_norm(k, f"layers.{i}.k_norm"), v


@register
class GemmaImporter(DecoderImporter):
    """Gemma: GeGLU MLP, embeddings scaled by sqrt(hidden), norms that multiply by ``1 + w``."""

    architectures = ("gemma",)
    hf_norm_offset = 1.0
    activation = "gelu_tanh"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.c = replace(self.c, embedding_multiplier=math.sqrt(self.c.hidden_size))


@register
class Gemma2Importer(GemmaImporter):
    """Gemma 2: norms on both sides of each block, sliding-window layers alternating with
    global ones, soft-capped attention and final logits."""

    architectures = ("gemma2",)
    layer_parts = ("attn_norm", "q", "k", "v", "o", "post_attn_norm", "pre_ffn_norm", "gate", "up", "down",
                   "post_ffn_norm")

    def layer(self, i: int, residual: str, pending: str | None) -> tuple[str, str]:
        p = f"layers.{i}"
        residual, normed = self.norm(residual, pending, f"{p}.attn_norm", f"{p}/attn_norm")
        attention = self.rms_norm(self.attention(i, normed), f"{p}.post_attn_norm")
        residual, normed = self.norm(residual, attention, f"{p}.pre_ffn_norm", f"{p}/pre_ffn_norm")
        return residual, self.rms_norm(self.mlp(i, normed), f"{p}.post_ffn_norm")


@register
class Gemma3Importer(PerHeadNorms, Gemma2Importer):
    """Gemma 3 (text): Gemma 2's layout with per-head query/key norms instead of soft-capping,
    and sliding layers rotating with their own base frequency, unscaled."""

    architectures = ("gemma3",)
    layer_parts = Gemma2Importer.layer_parts + ("q_norm", "k_norm")

    def layer_rotary(self, i: int) -> tuple[str, str]:
        if not self.c.slides(i) or not self.c.rope_local_theta:
            return super().layer_rotary(i)
        if "local" not in self._rotary:
            self._rotary["local"] = self.rotary_caches(self.c.rope_local_theta, scaled=False, suffix="_local")
        return self._rotary["local"]


@register
class Phi3Importer(DecoderImporter):
    """Phi-3 / Phi-3.5 / Phi-4 (and Phi-4-mini's partial rotary and LongRoPE): fused
    query/key/value and gate/up matrices."""

    architectures = ("phi3",)
    layer_parts = ("attn_norm", "qkv", "o", "ffn_norm", "gate_up", "down")

    def qkv_names(self, i: int) -> list[str]:
        return [f"layers.{i}.qkv"]

    def gate_up_names(self, i: int) -> list[list[str]]:
        return [[f"layers.{i}.gate_up"]]

    def gate_and_up(self, i: int, x: str) -> tuple[str, str]:
        w, p = self.w, f"layers.{i}"
        fused = self.linear(x, [f"{p}.gate_up"], f"{p}/gate_up")
        halves = w.constant(f"{p}/gate_up_sizes", [self.c.intermediate_size] * 2)
        gate, up = w.node("Split", [fused, halves], f"{p}/gate_up_split", 2, axis=-1)
        return gate, up
