"""Build a tiny random Llama model and a byte-level tokenizer at test time (seconds).

Byte-level tokens are deliberate: every multi-byte UTF-8 character spans several
tokens and every multi-character stop string spans token boundaries, which is what
the streaming and stop-string tests need to exercise.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(out_dir: Path) -> dict[str, int]:
    """Write tokenizer.json/tokenizer_config.json; return the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": CHATML_TEMPLATE, "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return vocab


def build_tiny_hf_model(out_dir: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with random weights, saved as a Hugging Face folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out_dir)
    vocab_size = len(vocab)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Favour printable ASCII, space and newline (byte-level symbols 'Ġ' and 'Ċ'): outputs then
    # look like text, so tests can pick stop strings from them; other bytes stay possible.
    printable = [vocab[chr(c)] for c in range(33, 127)] + [vocab["Ġ"], vocab["Ċ"]]
    scale = torch.full((vocab_size, 1), 0.5)
    scale[printable] = 8.0
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    model.save_pretrained(out_dir)
    return out_dir
