"""Write tiny GGUF files at test time, laid out the way llama.cpp's converter lays them out.

Written independently of the importer under test: tensor names and metadata keys follow
the GGUF convention, Llama-family query/key rows are reordered for adjacent-pair rotary
(llama.cpp's "normal" rope), and the byte-level test tokenizer goes in as a ``gpt2``
vocabulary. K-quant blocks, which the ``gguf`` package cannot quantize, are written as
random bytes of a valid layout. :func:`write_gguf` then puts the values the file's blocks
decode to back into the Hugging Face folder, so transformers on that folder computes with
exactly the file's weights: the reference for an import of the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tiny_model import CHATML_TEMPLATE

#: Hugging Face parameter names -> GGUF tensor names (per layer parts after ``blk.N.``).
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
#: Families whose GGUF query/key rows are stored for adjacent rotary pairs.
_PAIRED_ROTARY = {"llama", "granite", "mistral"}


def _pair_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Per head, rows [first half..., second half...] -> [(h0, h1), (h0, h1), ...]."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _unpair_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def random_k_quant_blocks(rows: int, cols: int, qtype_name: str, seed: int) -> np.ndarray:
    """Bytes of a valid K-quant matrix with small values (random codes, tame super-block scales)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype_name]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    if qtype_name == "Q4_K":  # d and dmin (fp16) lead the block
        raw[..., 0:2] = np.frombuffer(np.float16(2e-4).tobytes(), np.uint8)
        raw[..., 2:4] = np.frombuffer(np.float16(1e-4).tobytes(), np.uint8)
    elif qtype_name == "Q6_K":  # d (fp16) ends the block
        raw[..., -2:] = np.frombuffer(np.float16(1e-3).tobytes(), np.uint8)
    else:
        raise ValueError(qtype_name)
    return raw.reshape(rows, -1)


def write_gguf(hf_dir: Path, path: Path, qtype: str, family: str = "llama",
               k_quant_names: tuple[str, ...] = ()) -> Path:
    """Write the model in ``hf_dir`` as a GGUF whose matrices are ``qtype`` (F32, F16, Q8_0,
    Q4_0, Q4_1, ...). Matrices whose GGUF name contains one of ``k_quant_names`` become
    random Q4_K blocks instead, and ``hf_dir`` is rewritten with their values."""
    import gguf
    from gguf import GGMLQuantizationType, quants
    from safetensors.numpy import load_file, save_file

    config = json.loads((hf_dir / "config.json").read_text())
    weights = load_file(str(hf_dir / "model.safetensors"))
    arch = "llama" if family == "mistral" else family
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_vocab_size(config["vocab_size"])
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    _add_tokenizer(writer, hf_dir)
    for index, (hf_name, value) in enumerate(sorted(weights.items())):
        name = _gguf_name(hf_name)
        value = value.astype(np.float32)
        paired = family in _PAIRED_ROTARY and name.endswith(("attn_q.weight", "attn_k.weight"))
        pair_heads = heads if "attn_q" in name else kv_heads
        if paired:
            value = _pair_rows(value, pair_heads)
        if value.ndim == 1:
            writer.add_tensor(name, value)
            continue
        kind = GGMLQuantizationType.Q4_K if any(part in name for part in k_quant_names) \
            else GGMLQuantizationType[qtype]
        if kind == GGMLQuantizationType.Q4_K:
            stored = random_k_quant_blocks(value.shape[0], value.shape[1], "Q4_K", seed=index)
        elif kind == GGMLQuantizationType.F32:
            stored = value
        elif kind == GGMLQuantizationType.F16:
            stored = value.astype(np.float16)
        else:
            stored = quants.quantize(value, kind)
        writer.add_tensor(name, stored, raw_dtype=kind if stored.dtype == np.uint8 else None)
        decoded = quants.dequantize(stored, kind).reshape(value.shape).astype(np.float32)
        weights[hf_name] = _unpair_rows(decoded, pair_heads) if paired else decoded
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(hf_dir / "model.safetensors"))
    return path


def _gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    _, _, index, rest = hf_name.split(".", 3)
    return f"blk.{index}.{_LAYER[rest]}"


def _add_tokenizer(writer, hf_dir: Path) -> None:
    tokenizer = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {entry["id"] for entry in tokenizer.get("added_tokens", [])}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges([" ".join(pair) for pair in tokenizer["model"]["merges"]]
                            if tokenizer["model"]["merges"] and not isinstance(tokenizer["model"]["merges"][0], str)
                            else tokenizer["model"]["merges"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)
