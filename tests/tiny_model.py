"""Build a tiny random Llama model and a byte-level tokenizer at test time (seconds).

Byte-level tokens are deliberate: every multi-byte UTF-8 character spans several
tokens and every multi-character stop string spans token boundaries, which is what
the streaming and stop-string tests need to exercise.
"""

from __future__ import annotations

import json
from typing import Any
from pathlib import Path

import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


#: Merges for :func:`build_tokenizer`'s ``merges`` (a GGUF "gpt2" vocabulary needs some).
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]


def build_tokenizer(out_dir: Path, merges: int = 0, gguf_decoder: bool = True) -> dict[str, int]:
    """Write tokenizer.json/tokenizer_config.json; return the vocabulary. Byte-level tokens,
    plus the first ``merges`` of :data:`MERGES`.

    ``gguf_decoder``: decode as transformers' conversion of a Llama-architecture GGUF with a
    byte-level vocabulary does (Llama 3, SmolLM2: ``Sequence[ByteFallback, Fuse, Replace,
    ByteLevel, Strip]``), as most users' models do, instead of plain ``ByteLevel`` (a Hugging Face
    folder's). The text is the same but for the first token's leading space; readers that
    look for a plain ``ByteLevel`` decoder get it wrong (a constraint engine once did)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    for left, right in MERGES[:merges]:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=MERGES[:merges]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.Sequence([
        decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("▁", " "), decoders.ByteLevel(),
        decoders.Strip(" ", 1, 0)]) if gguf_decoder else decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": CHATML_TEMPLATE, "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return vocab


#: Tiny configurations of each family the importer covers (Hugging Face class names).
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {
        "embedding_multiplier": 4.0, "residual_multiplier": 0.5, "attention_multiplier": 0.2,
        "logits_scaling": 2.0}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    # Windows and caps small enough that a 40-token prompt feels them.
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {
        "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 8, "attn_logit_softcapping": 1.0,
        "final_logit_softcapping": 3.0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 8, "rope_local_base_freq": 100.0,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0}, "layer_types": ["sliding_attention", "full_attention"]}),
    # Phi-4-mini's shape: rotary on half of each head, LongRoPE (short factors within 1,024).
    # (ONNX Runtime's rotary wants a multiple of 16 dimensions: 2 heads of 32, 16 of them turned.)
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {
        "num_attention_heads": 2, "num_key_value_heads": 1, "partial_rotary_factor": 0.5,
        "original_max_position_embeddings": 1024,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0],
                         "long_factor": [2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0]}}),
}
#: Families whose norm weights are stored as ``w`` and applied as ``1 + w``.
GEMMA_FAMILIES = ("gemma", "gemma2", "gemma3")


def build_tiny_hf_model(out_dir: Path, seed: int = 0, family: str = "llama", tied: bool = False,
                        hidden_size: int = 64, layers: int = 2, merges: int = 0, **config: Any) -> Path:
    """A 2-layer model of ``family`` with random weights, saved as a Hugging Face folder
    (``config`` overrides the family's configuration)."""
    import torch
    import transformers

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out_dir, merges)
    vocab_size = len(vocab)
    torch.manual_seed(seed)
    config_name, model_name, extra = FAMILIES[family]
    fields = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tied,
    )
    config = getattr(transformers, config_name)(**{**fields, **extra, **config})
    model = getattr(transformers, model_name)(config)
    # Favour printable ASCII, space and newline (byte-level symbols 'Ġ' and 'Ċ'): outputs then
    # look like text, so tests can pick stop strings from them; other bytes stay possible.
    printable = [vocab[chr(c)] for c in range(33, 127)] + [vocab["Ġ"], vocab["Ċ"]]
    scale = torch.full((vocab_size, 1), 0.5)
    scale[printable] = 8.0
    with torch.no_grad():
        if family == "qwen2":  # give the projection biases something to do
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
        if family in ("qwen3", "olmo2", "gemma3"):
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
        if family in GEMMA_FAMILIES:  # stored as w for 1 + w: zeros would hide a missing offset
            for name, weight in model.named_parameters():
                if "norm" in name:
                    weight.uniform_(-0.5, 0.5)
        if not tied:
            model.lm_head.weight.mul_(scale)
    model.save_pretrained(out_dir)
    return out_dir


def reference_logits(hf_dir: Path, token_ids: list[int]) -> "np.ndarray":
    """transformers' float32 logits for the last position of ``token_ids``."""
    import torch
    import transformers

    # Eager attention: the one that applies Gemma 2's soft-capping.
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                              attn_implementation="eager")
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0, -1].numpy()
