"""Read a model's configuration and its tensors one at a time, from a GGUF file or a
Hugging Face folder, without loading the model.

Both readers map the file into memory (``numpy.memmap``): a tensor's bytes are read
from disk when a quantizer touches them and are dropped by the page cache afterwards,
so preparing a model holds one tensor at a time, never the whole model.

Tensors are addressed by one naming scheme for both sources (``embed``, ``final_norm``,
``lm_head``, ``rope_freqs`` and ``layers.{i}.{part}`` with part one of :data:`LAYER_PARTS`),
so an architecture class describes its graph once and reads either source.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np

#: Per-layer tensor names, ours -> GGUF's -> Hugging Face's (under ``model.layers.{i}.``).
LAYER_PARTS: dict[str, tuple[str, str]] = {
    "attn_norm": ("attn_norm.weight", "input_layernorm.weight"),
    "q": ("attn_q.weight", "self_attn.q_proj.weight"),
    "k": ("attn_k.weight", "self_attn.k_proj.weight"),
    "v": ("attn_v.weight", "self_attn.v_proj.weight"),
    "o": ("attn_output.weight", "self_attn.o_proj.weight"),
    "q_bias": ("attn_q.bias", "self_attn.q_proj.bias"),
    "k_bias": ("attn_k.bias", "self_attn.k_proj.bias"),
    "v_bias": ("attn_v.bias", "self_attn.v_proj.bias"),
    "q_norm": ("attn_q_norm.weight", "self_attn.q_norm.weight"),
    "k_norm": ("attn_k_norm.weight", "self_attn.k_norm.weight"),
    "ffn_norm": ("ffn_norm.weight", "post_attention_layernorm.weight"),
    "gate": ("ffn_gate.weight", "mlp.gate_proj.weight"),
    "up": ("ffn_up.weight", "mlp.up_proj.weight"),
    "down": ("ffn_down.weight", "mlp.down_proj.weight"),
    # OLMo 2 normalizes the attention and MLP outputs instead of their inputs (its Hugging Face
    # name for the first is the one Llama uses for the norm before the MLP).
    "post_attn_norm": ("post_attention_norm.weight", "post_attention_layernorm.weight"),
    "post_ffn_norm": ("post_ffw_norm.weight", "post_feedforward_layernorm.weight"),
    # Gemma 2/3 normalize both the input and the output of each block.
    "pre_ffn_norm": ("ffn_norm.weight", "pre_feedforward_layernorm.weight"),
    # Phi-3 stores the query/key/value and the gate/up projections fused.
    "qkv": ("attn_qkv.weight", "self_attn.qkv_proj.weight"),
    "gate_up": ("ffn_up.weight", "mlp.gate_up_proj.weight"),
}
GLOBAL_PARTS: dict[str, tuple[str, str]] = {
    "embed": ("token_embd.weight", "model.embed_tokens.weight"),
    "final_norm": ("output_norm.weight", "model.norm.weight"),
    "lm_head": ("output.weight", "lm_head.weight"),
    "rope_freqs": ("rope_freqs.weight", ""),
    # Phi-3's LongRoPE frequency factors (a Hugging Face config lists them instead).
    "rope_factors_short": ("rope_factors_short.weight", ""),
}


class SourceError(ValueError):
    """The file cannot be read as a model; the message names what is wrong."""


class UnsupportedArchitecture(SourceError):
    """A model the importer cannot build (its architecture, weight format or rotary scaling)
    but another builder may."""


@dataclass
class ModelConfig:
    """What the graph needs to know, the same for a GGUF and a Hugging Face folder."""

    architecture: str  # GGUF spelling: llama, qwen2, qwen3, granite, olmo2, ...
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_eps: float
    rope_theta: float
    context_length: int
    rope_scaling: dict = field(default_factory=dict)
    tied_embeddings: bool = False
    #: Granite's multipliers (1.0 elsewhere) and the attention scale (None = 1/sqrt(head_dim)).
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    attention_scale: float | None = None
    #: Attention and final logits soft-capped as ``cap * tanh(x / cap)`` (Gemma 2; 0 = off).
    attention_softcap: float = 0.0
    final_softcap: float = 0.0
    #: Window of the sliding-window layers (a token sees itself and ``sliding_window - 1``
    #: before it), which layers slide, and their own rotary base (Gemma 3).
    sliding_window: int | None = None
    sliding_layers: list[bool] = field(default_factory=list)
    rope_local_theta: float | None = None
    #: Leading dimensions of each head that the rotary turns (Phi-4-mini: 3/4 of them).
    rotary_dim: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def slides(self, layer: int) -> bool:
        """Whether ``layer`` attends through a sliding window."""
        if not self.sliding_window or self.sliding_window >= self.context_length:
            return False
        return self.sliding_layers[layer] if self.sliding_layers else True

    @property
    def parameters(self) -> int:
        """Weights in the model (embedding and output matrix counted once each)."""
        attention = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        layer = attention + 3 * self.hidden_size * self.intermediate_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        return self.num_layers * layer + embeddings


@dataclass
class Tensor:
    """One stored tensor: 2-D weights as (rows, columns) like a PyTorch Linear's [out, in]."""

    name: str
    shape: tuple[int, ...]
    #: GGUF block type name (``Q4_0``, ``Q8_0``, ``Q4_K``...) or a float dtype (``F32``, ``F16``, ``BF16``).
    dtype: str
    _raw: np.ndarray  # the stored bytes/values, rows first

    @property
    def is_quantized(self) -> bool:
        return self.dtype not in ("F32", "F16", "BF16")

    def raw_rows(self, start: int, stop: int) -> np.ndarray:
        """Stored data of rows [start, stop): GGUF blocks as uint8 bytes, or the float values."""
        return np.asarray(self._raw[start:stop])

    def float_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32 (de-quantized if stored in blocks)."""
        raw = np.asarray(self._raw[start:stop])
        if self.dtype == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        if not self.is_quantized:
            return raw.astype(np.float32)
        from gguf import GGMLQuantizationType, quants

        values = quants.dequantize(raw, GGMLQuantizationType[self.dtype])
        return values.reshape(stop - start, -1).astype(np.float32, copy=False)

    def to_float(self) -> np.ndarray:
        """The whole tensor as float32 in its logical shape (for the small ones: norms, biases)."""
        if len(self.shape) > 1:
            return self.float_rows(0, self.shape[0]).reshape(self.shape)
        whole = Tensor(self.name, (1, self.shape[0]), self.dtype, np.asarray(self._raw).reshape(1, -1))
        return whole.float_rows(0, 1).reshape(-1)

    @property
    def nbytes(self) -> int:
        return int(self._raw.nbytes)


class TensorSource:
    """Common interface of the two readers."""

    kind = ""
    path: Path
    config: ModelConfig

    def get(self, name: str) -> Tensor | None:
        raise NotImplementedError

    def maps(self) -> list[np.memmap]:
        """The file mappings tensors are read through."""
        raise NotImplementedError

    def drop_pages(self) -> None:
        """Let go of the mapped pages read so far. They are clean file pages (the kernel keeps
        them in its cache), but they count toward this process's resident memory until dropped."""
        for mapping in self.maps():
            raw = getattr(mapping, "_mmap", None)
            if raw is not None and hasattr(raw, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                raw.madvise(mmap.MADV_DONTNEED)

    def require(self, name: str) -> Tensor:
        tensor = self.get(name)
        if tensor is None:
            raise SourceError(f"{self.path.name} has no tensor for {name!r}")
        return tensor



# --------------------------------------------------------------------------- GGUF


class GGUFSource(TensorSource):
    kind = "gguf"

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader

        self.path = Path(path)
        try:
            self._reader = GGUFReader(str(self.path))
        except Exception as exc:  # the gguf package raises ValueError/struct errors on damage
            raise SourceError(f"{self.path.name} is not a readable GGUF file ({exc})") from exc
        self.fields = self._reader.fields
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.config = self._read_config()

    def value(self, key: str, default: object = None) -> object:
        return gguf_value(self.fields, key, default)

    def _read_config(self) -> ModelConfig:
        arch = str(self.value("general.architecture", ""))
        if not arch:
            raise SourceError(f"{self.path.name} does not name its architecture (general.architecture)")

        def key(name: str, default: object = None) -> object:
            return self.value(f"{arch}.{name}", default)

        def number(name: str, default: object = None) -> int:
            """A per-model count; a per-layer list is accepted when all layers agree."""
            value = key(name, default)
            if isinstance(value, list):
                if len(set(value)) != 1:
                    raise UnsupportedArchitecture(f"{self.path.name}: {name} differs between layers ({arch!r})")
                value = value[0]
            return int(value or 0)

        hidden, heads, layers = number("embedding_length"), number("attention.head_count"), number("block_count")
        if not hidden or not heads or not layers:
            raise SourceError(f"{self.path.name}: architecture {arch!r} lacks embedding_length, head_count "
                              "or block_count")
        kv_heads = number("attention.head_count_kv", heads)
        gate = self._tensors.get("blk.0.ffn_gate.weight") or self._tensors.get("blk.0.ffn_up.weight")
        ffn = number("feed_forward_length") or (int(gate.shape[1]) if gate is not None else 0)
        embed = self._tensors.get("token_embd.weight")
        vocab = int(key("vocab_size", 0) or (int(embed.shape[1]) if embed is not None else 0))
        scaling: dict = {}
        scaling_type = key("rope.scaling.type")
        if scaling_type and scaling_type != "none":
            scaling = {"rope_type": str(scaling_type), "factor": float(key("rope.scaling.factor", 1.0))}
            original = key("rope.scaling.original_context_length")
            if original:
                scaling["original_max_position_embeddings"] = int(original)
        head_dim = number("attention.key_length") or hidden // heads
        extras = _gguf_family_extras(arch, key, self._tensors, hidden, heads, layers, head_dim)
        context = int(key("context_length", 4096))
        if "rope_factors_short.weight" in self._tensors:  # Phi-3's LongRoPE: served within its trained window
            original = int(key("rope.scaling.original_context_length") or context)
            scaling = {"rope_type": "longrope", "attention_factor": key("rope.scaling.attn_factor"),
                       "original_max_position_embeddings": original, "factor": context / original}
            context = min(context, original)
        eos = self.value("tokenizer.ggml.eos_token_id")
        bos = self.value("tokenizer.ggml.bos_token_id")
        eot = self.value("tokenizer.ggml.eot_token_id")
        eos_ids = [int(i) for i in (eos, eot) if i is not None]
        attention_scale = key("attention.scale")
        return ModelConfig(
            architecture=arch, hidden_size=hidden, num_layers=layers,
            num_heads=heads, num_kv_heads=kv_heads,
            head_dim=head_dim, intermediate_size=ffn, vocab_size=vocab,
            rms_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            context_length=context, rope_scaling=scaling,
            tied_embeddings="output.weight" not in self._tensors,
            embedding_multiplier=float(key("embedding_scale", 1.0)),
            residual_multiplier=float(key("residual_scale", 1.0)),
            logits_scaling=float(key("logit_scale", 1.0)),
            attention_scale=float(attention_scale) if attention_scale else extras.pop("attention_scale", None),
            bos_token_id=int(bos) if bos is not None else None, eos_token_ids=list(dict.fromkeys(eos_ids)),
            **extras,
        )

    def maps(self) -> list[np.memmap]:
        return [self._reader.data]

    def get(self, name: str) -> Tensor | None:
        gguf_name = _gguf_name(name)
        tensor = self._tensors.get(gguf_name) if gguf_name else None
        if tensor is None:
            return None
        # GGUF lists dimensions innermost first; the data array is already rows first.
        shape = tuple(int(d) for d in reversed(tensor.shape))
        data = tensor.data
        if tensor.tensor_type.name == "BF16":  # the reader hands BF16 over as raw bytes
            data = data.view(np.uint16).reshape(shape)
        return Tensor(name, shape, tensor.tensor_type.name, data)



#: Gemma 2 and 3 at 27B scale the queries by 1/sqrt(hidden / heads) instead of
#: 1/sqrt(head_dim) (their ``query_pre_attn_scalar``); GGUF files do not store it, so, like
#: llama.cpp, we tell the 27B models by their layer counts.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
#: Every n-th layer of these families attends to the whole context, the others slide
#: (llama.cpp's fixed patterns; Gemma 2 alternates, starting with a sliding layer).
_GEMMA_FULL_EVERY = {"gemma2": 2, "gemma3": 6}


def _gguf_family_extras(arch: str, key, tensors: dict, hidden: int, heads: int, layers: int,
                        head_dim: int) -> dict:
    """The ModelConfig fields a family keeps under its own GGUF keys (or implies)."""
    extras: dict = {}
    window = key("attention.sliding_window")
    pattern = key("attention.sliding_window_pattern")  # newer files: every n-th full, or a flag per layer
    if isinstance(pattern, list) and len(pattern) == layers:
        extras["sliding_layers"] = [bool(flag) for flag in pattern]
    if arch in _GEMMA_FULL_EVERY:
        every = int(pattern) if isinstance(pattern, int) and pattern > 0 else _GEMMA_FULL_EVERY[arch]
        extras["sliding_window"] = int(window) if window else None
        extras.setdefault("sliding_layers", [(i + 1) % every != 0 for i in range(layers)])
        scalar = hidden / heads if layers == _GEMMA_27B_LAYERS[arch] else head_dim
        extras["attention_scale"] = scalar ** -0.5
        extras["attention_softcap"] = float(key("attn_logit_softcapping", 0.0) or 0.0)
        extras["final_softcap"] = float(key("final_logit_softcapping", 0.0) or 0.0)
        if arch == "gemma3":
            extras["rope_local_theta"] = float(key("rope.freq_base_swa", 10000.0))
    elif window:
        extras["sliding_window"] = int(window)
    rotary = key("rope.dimension_count")
    if rotary and int(rotary) != head_dim:
        extras["rotary_dim"] = int(rotary)
    return extras


def gguf_value(fields: dict, key: str, default: object = None) -> object:
    """One metadata value of a GGUFReader's ``fields`` (``default`` when absent or unreadable)."""
    item = fields.get(key)
    if item is None or not item.data:
        return default
    try:
        return item.contents()
    except Exception:  # the gguf package raises several types on odd fields
        return default


def _gguf_name(name: str) -> str:
    if name.startswith("layers."):
        _, index, part = name.split(".", 2)
        return f"blk.{index}.{LAYER_PARTS[part][0]}"
    return GLOBAL_PARTS[name][0]


# --------------------------------------------------------------------------- safetensors

#: Where a checkpoint keeps its decoder: text models, then the two layouts multimodal
#: checkpoints have used (transformers >= 4.52, and before).
_HF_TEXT_PREFIXES = ("model.", "model.language_model.", "language_model.model.")

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}

#: Hugging Face ``architectures`` names -> the GGUF spelling the importers register under.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "GraniteForCausalLM": "granite", "Olmo2ForCausalLM": "olmo2",
    "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3", "Gemma3ForConditionalGeneration": "gemma3",
    "Phi3ForCausalLM": "phi3", "GemmaForCausalLM": "gemma", "OlmoForCausalLM": "olmo",
}


class SafetensorsSource(TensorSource):
    """A Hugging Face folder: ``config.json`` plus one or more ``*.safetensors`` files,
    read lazily (the format is a JSON header followed by raw little-endian arrays)."""

    kind = "hf_dir"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise SourceError(f"{self.path} has no config.json")
        self.hf_config = json.loads(config_path.read_text())
        self._index: dict[str, tuple[Path, dict]] = {}
        self._architecture()  # an unknown architecture fails before the weights are looked at
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise UnsupportedArchitecture(
                f"{self.path} holds no .safetensors weights (PyTorch .bin checkpoints are not read: "
                "convert them to safetensors first)"
            )
        for file in files:
            for name, entry in _safetensors_header(file).items():
                self._index[name] = (file, entry)
        # A multimodal checkpoint (Gemma 3 4B+) keeps its text model under a prefix.
        self._prefix = next((p for p in _HF_TEXT_PREFIXES if f"{p}embed_tokens.weight" in self._index), "model.")
        self._maps: dict[Path, np.memmap] = {}
        self.config = self._read_config()

    def _text_config(self) -> dict:
        """The language model's settings. A multimodal checkpoint nests them under
        ``text_config`` and saves only the values that differ from the defaults, which
        transformers' config class fills in."""
        if "text_config" not in self.hf_config:
            return self.hf_config
        nested = self.hf_config["text_config"]
        try:
            from transformers import AutoConfig

            defaults = AutoConfig.from_pretrained(self.path).to_dict().get("text_config") or {}
        except Exception:  # an unknown model type or transformers' own complaint: use what is there
            defaults = {}
        return {**defaults, **nested}

    def _read_config(self) -> ModelConfig:
        config = self._text_config()
        arch = self._architecture()
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        eos = config.get("eos_token_id", self.hf_config.get("eos_token_id"))
        eos_ids = [int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None]
        generation = self.path / "generation_config.json"
        if generation.is_file():
            extra = json.loads(generation.read_text()).get("eos_token_id")
            eos_ids += [int(i) for i in (extra if isinstance(extra, list) else [extra]) if i is not None]
        bos = config.get("bos_token_id", self.hf_config.get("bos_token_id"))
        scaling = dict(config.get("rope_scaling") or {})
        if scaling and "rope_type" not in scaling and "type" in scaling:
            scaling["rope_type"] = scaling["type"]
        tied = bool(config.get("tie_word_embeddings", self.hf_config.get("tie_word_embeddings", False)))
        if self._hf_name("lm_head") not in self._index:
            tied = True
        multiplier = config.get("attention_multiplier")
        if not multiplier and config.get("query_pre_attn_scalar"):  # Gemma 2/3
            multiplier = float(config["query_pre_attn_scalar"]) ** -0.5
        context = int(config.get("max_position_embeddings", 4096))
        original = config.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
        if scaling.get("rope_type") == "longrope":
            # Phi-3's long factors serve beyond the trained window; we serve within it (short factors).
            scaling["original_max_position_embeddings"] = int(original or context)
            scaling.setdefault("factor", context / int(original or context))
            context = min(context, int(original or context))
        window = config.get("sliding_window") if config.get("use_sliding_window", True) is not False else None
        layer_types = config.get("layer_types") or _default_layer_types(arch, config)
        head_dim = int(config.get("head_dim") or hidden // heads)
        rotary = int(head_dim * float(config.get("partial_rotary_factor", 1.0)))
        return ModelConfig(
            architecture=arch, hidden_size=hidden, num_layers=int(config["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=head_dim, intermediate_size=int(config.get("intermediate_size", 0)),
            vocab_size=int(config["vocab_size"]), rms_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(config.get("rope_theta", 10000.0)),
            context_length=context, rope_scaling=scaling,
            tied_embeddings=tied,
            embedding_multiplier=float(config.get("embedding_multiplier", 1.0)),
            residual_multiplier=float(config.get("residual_multiplier", 1.0)),
            logits_scaling=float(config.get("logits_scaling", 1.0)),
            attention_scale=float(multiplier) if multiplier else None,
            attention_softcap=float(config.get("attn_logit_softcapping") or 0.0),
            final_softcap=float(config.get("final_logit_softcapping") or 0.0),
            sliding_window=int(window) if window else None,
            sliding_layers=[kind == "sliding_attention" for kind in layer_types] if layer_types else [],
            rope_local_theta=float(config["rope_local_base_freq"]) if config.get("rope_local_base_freq") else None,
            rotary_dim=rotary if rotary != head_dim else None,
            bos_token_id=int(bos) if isinstance(bos, int) else None,
            eos_token_ids=list(dict.fromkeys(eos_ids)),
        )

    def _architecture(self) -> str:
        names = self.hf_config.get("architectures") or []
        arch = next((HF_ARCHITECTURES[n] for n in names if n in HF_ARCHITECTURES), "")
        if not arch:
            named = ", ".join(names) or self.hf_config.get("model_type")
            raise UnsupportedArchitecture(f"{self.path.name}: architecture {named!r} is not one the importer knows")
        return arch

    def _map(self, file: Path) -> np.memmap:
        if file not in self._maps:
            self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
        return self._maps[file]

    def maps(self) -> list[np.memmap]:
        return list(self._maps.values())

    def get(self, name: str) -> Tensor | None:
        hf_name = self._hf_name(name)
        entry = self._index.get(hf_name) if hf_name else None
        if entry is None:
            return None
        file, info = entry
        dtype = info["dtype"]
        if dtype not in _SAFETENSORS_DTYPES:
            raise UnsupportedArchitecture(f"{hf_name} is stored as {dtype}; the importer reads F32, F16 and BF16")
        start, stop = info["data_offsets"]
        base = 8 + int(info["_header_size"])
        raw = self._map(file)[base + start: base + stop].view(_SAFETENSORS_DTYPES[dtype])
        shape = tuple(int(d) for d in info["shape"])
        return Tensor(name, shape, dtype, raw.reshape(shape))

    def _hf_name(self, name: str) -> str:
        if name.startswith("layers."):
            _, index, part = name.split(".", 2)
            return f"{self._prefix}layers.{index}.{LAYER_PARTS[part][1]}"
        hf_name = GLOBAL_PARTS[name][1]
        if hf_name.startswith("model."):
            return self._prefix + hf_name[len("model."):]
        if hf_name == "lm_head.weight" and self._prefix == "language_model.model.":
            return "language_model.lm_head.weight"
        return hf_name



def _default_layer_types(arch: str, config: dict) -> list[str]:
    """Which layers slide, for configs written before ``layer_types`` existed."""
    every = _GEMMA_FULL_EVERY.get(arch)
    if every is None:
        return []
    every = int(config.get("sliding_window_pattern") or every)
    return ["sliding_attention" if (i + 1) % every else "full_attention"
            for i in range(int(config["num_hidden_layers"]))]


def _safetensors_header(file: Path) -> dict[str, dict]:
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise SourceError(f"{file.name} is not a safetensors file")
        (size,) = struct.unpack("<Q", prefix)
        if size > 100_000_000:
            raise SourceError(f"{file.name} has an implausible safetensors header")
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    for entry in header.values():
        entry["_header_size"] = size
    return header


def open_source(path: Path) -> TensorSource:
    """A reader for a ``.gguf`` file or a Hugging Face folder."""
    path = Path(path)
    if path.is_file():
        return GGUFSource(path)
    return SafetensorsSource(path)
