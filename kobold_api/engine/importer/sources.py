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
}
GLOBAL_PARTS: dict[str, tuple[str, str]] = {
    "embed": ("token_embd.weight", "model.embed_tokens.weight"),
    "final_norm": ("output_norm.weight", "model.norm.weight"),
    "lm_head": ("output.weight", "lm_head.weight"),
    "rope_freqs": ("rope_freqs.weight", ""),
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
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

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
        eos = self.value("tokenizer.ggml.eos_token_id")
        bos = self.value("tokenizer.ggml.bos_token_id")
        eot = self.value("tokenizer.ggml.eot_token_id")
        eos_ids = [int(i) for i in (eos, eot) if i is not None]
        attention_scale = key("attention.scale")
        return ModelConfig(
            architecture=arch, hidden_size=hidden, num_layers=layers,
            num_heads=heads, num_kv_heads=kv_heads,
            head_dim=number("attention.key_length") or hidden // heads,
            intermediate_size=ffn, vocab_size=vocab,
            rms_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            context_length=int(key("context_length", 4096)), rope_scaling=scaling,
            tied_embeddings="output.weight" not in self._tensors,
            embedding_multiplier=float(key("embedding_scale", 1.0)),
            residual_multiplier=float(key("residual_scale", 1.0)),
            logits_scaling=float(key("logit_scale", 1.0)),
            attention_scale=float(attention_scale) if attention_scale else None,
            bos_token_id=int(bos) if bos is not None else None, eos_token_ids=list(dict.fromkeys(eos_ids)),
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
        self._maps: dict[Path, np.memmap] = {}
        self.config = self._read_config()

    def _read_config(self) -> ModelConfig:
        config = self.hf_config.get("text_config", self.hf_config)
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
        if "lm_head.weight" not in self._index:
            tied = True
        multiplier = config.get("attention_multiplier")
        return ModelConfig(
            architecture=arch, hidden_size=hidden, num_layers=int(config["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate_size=int(config.get("intermediate_size", 0)),
            vocab_size=int(config["vocab_size"]), rms_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(config.get("rope_theta", 10000.0)),
            context_length=int(config.get("max_position_embeddings", 4096)), rope_scaling=scaling,
            tied_embeddings=tied,
            embedding_multiplier=float(config.get("embedding_multiplier", 1.0)),
            residual_multiplier=float(config.get("residual_multiplier", 1.0)),
            logits_scaling=float(config.get("logits_scaling", 1.0)),
            attention_scale=float(multiplier) if multiplier else None,
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
        hf_name = _hf_name(name)
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



def _hf_name(name: str) -> str:
    if name.startswith("layers."):
        _, index, part = name.split(".", 2)
        return f"model.layers.{index}.{LAYER_PARTS[part][1]}"
    return GLOBAL_PARTS[name][1]


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
