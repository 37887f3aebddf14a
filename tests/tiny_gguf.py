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
#: Gemma 2/3 norm both sides of each block; Phi-3 fuses its projections.
_FAMILY_LAYER = {
    "gemma2": {"post_attention_layernorm.weight": "post_attention_norm.weight",
               "pre_feedforward_layernorm.weight": "ffn_norm.weight",
               "post_feedforward_layernorm.weight": "post_ffw_norm.weight"},
    "phi3": {"self_attn.qkv_proj.weight": "attn_qkv.weight", "mlp.gate_up_proj.weight": "ffn_up.weight"},
}
_FAMILY_LAYER["gemma3"] = _FAMILY_LAYER["gemma2"]
_FAMILY_LAYER["olmo2"] = {"post_attention_layernorm.weight": "post_attention_norm.weight",
                          "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
#: Families whose GGUF norm weights hold 1 + w (llama.cpp's converter adds the one).
_NORM_PLUS_ONE = {"gemma", "gemma2", "gemma3"}
#: Families whose GGUF vocabulary is SentencePiece-style (tokens with scores), which
#: transformers' converters for them expect.
SPM_VOCAB = {"gemma", "gemma2", "gemma3", "phi3"}
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
    _add_family_metadata(writer, family, config)
    if family in SPM_VOCAB:
        _add_spm_tokenizer(writer, config["vocab_size"])
    else:
        _add_tokenizer(writer, hf_dir)
    for index, (hf_name, value) in enumerate(sorted(weights.items())):
        name = _gguf_name(hf_name, family)
        value = value.astype(np.float32)
        if family in _NORM_PLUS_ONE and name.endswith("norm.weight"):
            writer.add_tensor(name, value + 1.0)
            continue
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


def _gguf_name(hf_name: str, family: str) -> str:
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    _, _, index, rest = hf_name.split(".", 3)
    return f"blk.{index}.{_FAMILY_LAYER.get(family, {}).get(rest) or _LAYER[rest]}"


def _add_family_metadata(writer, family: str, config: dict) -> None:
    """The keys llama.cpp's converter writes for the families with more than Llama's."""
    import gguf

    if config.get("sliding_window") and family.startswith("gemma"):
        writer.add_sliding_window(config["sliding_window"])
    if config.get("attn_logit_softcapping"):
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    if family == "granite":
        writer.add_embedding_scale(config["embedding_multiplier"])
        writer.add_residual_scale(config["residual_multiplier"])
        writer.add_attention_scale(config["attention_multiplier"])
        writer.add_logit_scale(config["logits_scaling"])
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    if family == "phi3":
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        writer.add_rope_dimension_count(int(head_dim * config.get("partial_rotary_factor", 1.0)))
        if scaling.get("type") == "longrope":
            original = config["original_max_position_embeddings"]
            factor = config["max_position_embeddings"] / original
            writer.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(factor) / np.log(original))))
            writer.add_rope_scaling_orig_ctx_len(original)
            writer.add_tensor("rope_factors_short.weight", np.array(scaling["short_factor"], np.float32))
            writer.add_tensor("rope_factors_long.weight", np.array(scaling["long_factor"], np.float32))


def write_tokenizer_gguf(path: Path, family: str, hf_dir: Path | None = None, words: tuple[str, ...] = ()) -> Path:
    """A GGUF with only a model's metadata and a tokenizer: the byte-level vocabulary of
    ``hf_dir`` as ``gpt2``, or (``hf_dir`` None) a SentencePiece one with ``words`` added."""
    import gguf

    writer = gguf.GGUFWriter(str(path), family)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(16)
    writer.add_feed_forward_length(32)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    if hf_dir is None:
        _add_spm_tokenizer(writer, 300, words)
    else:
        _add_tokenizer(writer, hf_dir)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_spm_tokenizer(writer, vocab_size: int, extra_words: tuple[str, ...] = ()) -> None:
    """A SentencePiece-style vocabulary (``llama`` model): control tokens, the 256 byte
    tokens, then word pieces up to ``vocab_size``."""
    special = ["<pad>", "<eos>", "<bos>", "<unk>"]
    pieces = [f"<0x{byte:02X}>" for byte in range(256)]
    words = ["▁", "▁t", "▁th", "▁the", "h", "e", "t", "n", "i", "▁hen", "▁thin", *extra_words]
    tokens = (special + pieces + words)[:vocab_size]
    tokens += [f"▁w{i}" for i in range(vocab_size - len(tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(special) + [0.0] * len(pieces)
                            + [-float(i) for i in range(len(tokens) - len(special) - len(pieces))])
    writer.add_token_types([3] * len(special) + [6] * len(pieces) + [1] * (len(tokens) - len(special) - len(pieces)))
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)


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
