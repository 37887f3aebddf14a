"""A GGUF's tokenizer as Hugging Face files (tokenizer.json, tokenizer_config.json with the
chat template), made by transformers' GGUF conversion in a child process.

The conversion needs PyTorch and transformers (about 500 MB resident); a child process
keeps them out of a server that only wants to load the model, and out of the memory the
tensor import holds at its peak.

    python -m kobold_api.engine.importer.gguf_tokenizer FILE.gguf OUT_DIR
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .sources import SourceError, gguf_value

#: The child's line that carries its error (its other output may be warnings).
_ERROR_MARK = "kobold_api tokenizer error: "


def convert(gguf_path: Path, out_dir: Path) -> None:
    """Write the tokenizer files of ``gguf_path`` into ``out_dir`` (a SourceError if it cannot)."""
    result = subprocess.run([sys.executable, "-m", __name__, str(gguf_path), str(out_dir)],
                            capture_output=True, text=True)
    if result.returncode != 0 or not (Path(out_dir) / "tokenizer.json").is_file():
        marked = [line for line in result.stderr.splitlines() if line.startswith(_ERROR_MARK)]
        reason = marked[-1][len(_ERROR_MARK):] if marked else f"exit {result.returncode}: {result.stderr[-300:]}"
        raise SourceError(f"could not read the tokenizer of {Path(gguf_path).name}: {reason}")


def apply_gguf_special_tokens(fields: dict, out_dir: Path) -> None:
    """Make the converted tokenizer follow the GGUF's own BOS/EOS metadata.

    transformers' conversion always adds a BOS-prepending post-processor and can name the
    wrong EOS; llama.cpp (so KoboldCpp) follows ``tokenizer.ggml.add_bos_token`` and
    ``eos_token_id``, and so must we, or raw Kobold prompts get a token KoboldCpp never adds.
    """
    tokenizer_path, config_path = out_dir / "tokenizer.json", out_dir / "tokenizer_config.json"
    tokenizer_json, config = json.loads(tokenizer_path.read_text()), json.loads(config_path.read_text())
    vocab = {token["id"]: token["content"] for token in tokenizer_json.get("added_tokens", [])}
    add_bos = gguf_value(fields, "tokenizer.ggml.add_bos_token")
    bos_id = gguf_value(fields, "tokenizer.ggml.bos_token_id")
    if add_bos is False or add_bos == 0:
        tokenizer_json["post_processor"] = None
        config["add_bos_token"] = False
    elif add_bos and tokenizer_json.get("post_processor") is None and isinstance(bos_id, int):
        # The generic fast class (rerouted architectures) adds no BOS by itself.
        tokens = gguf_value(fields, "tokenizer.ggml.tokens") or []
        if bos_id < len(tokens):
            tokenizer_json["post_processor"] = _bos_template(str(tokens[bos_id]), bos_id)
            config["add_bos_token"] = True
            config.setdefault("bos_token", str(tokens[bos_id]))
    _register_special_tokens(fields, tokenizer_json, vocab)
    eos_id = gguf_value(fields, "tokenizer.ggml.eos_token_id")
    if isinstance(eos_id, int) and eos_id in vocab:
        config["eos_token"] = vocab[eos_id]
    tokenizer_path.write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2))


def _register_special_tokens(fields: dict, tokenizer_json: dict, vocab: dict[int, str]) -> None:
    """The file's BOS/EOS/EOT/UNK/padding tokens as special added tokens (so decoding skips
    them), where the conversion did not register them; ``vocab`` gains them too."""
    tokens = gguf_value(fields, "tokenizer.ggml.tokens") or []
    for key in ("bos", "eos", "eot", "unknown", "padding"):
        token_id = gguf_value(fields, f"tokenizer.ggml.{key}_token_id")
        if isinstance(token_id, int) and token_id < len(tokens) and token_id not in vocab:
            vocab[token_id] = str(tokens[token_id])
            tokenizer_json.setdefault("added_tokens", []).append(
                {"id": token_id, "content": vocab[token_id], "single_word": False, "lstrip": False,
                 "rstrip": False, "normalized": False, "special": True})


def _bos_template(bos: str, bos_id: int) -> dict:
    """A tokenizers post-processor that puts ``bos`` before every sequence."""
    first = {"SpecialToken": {"id": bos, "type_id": 0}}
    return {"type": "TemplateProcessing",
            "single": [first, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [first, {"Sequence": {"id": "A", "type_id": 0}}, first, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


#: transformers picks a GGUF tokenizer's converter by the model's architecture, knows only
#: some architectures, and for Phi-3 assumes a vocabulary without a normalizer. The format
#: is the file's own ``tokenizer.ggml.model``: SentencePiece-style "llama" vocabularies
#: (Gemma's flavour for the Gemma families) or byte-level BPE "gpt2" ones.
_CONVERTER_BY_FORMAT = {"llama": "llama", "gpt2": "gpt2"}
#: Architectures whose own converter transformers has right (byte-level BPE with their
#: pre-tokenizer, Llama 3's included).
_OWN_CONVERTER = ("llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "gemma2", "gemma3")


def _convert_by_format(fields: dict) -> bool:
    """Point transformers' converter table for this file's architecture at the converter of
    its tokenizer format (in this child process only); False where transformers' own
    choice stands."""
    from transformers import modeling_gguf_pytorch_utils as loading
    from transformers.integrations import ggml

    arch = str(gguf_value(fields, "general.architecture", ""))
    form = _CONVERTER_BY_FORMAT.get(str(gguf_value(fields, "tokenizer.ggml.model", "")))
    if not arch or form is None or arch in _OWN_CONVERTER:
        return False
    if arch.startswith("gemma") and form == "llama":
        form = "gemma2"
    ggml.GGUF_TO_FAST_CONVERTERS[arch] = ggml.GGUF_TO_FAST_CONVERTERS[form]
    if arch not in loading.GGUF_SUPPORTED_ARCHITECTURES:
        loading.GGUF_SUPPORTED_ARCHITECTURES.append(arch)
    return True


def main(argv: list[str]) -> int:
    from gguf import GGUFReader
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    gguf_path, out_dir = Path(argv[0]), Path(argv[1])
    try:
        rerouted = _convert_by_format(GGUFReader(str(gguf_path)).fields)
        # A rerouted architecture may map to a slow tokenizer class in transformers (Granite's
        # GPT2Tokenizer); the generic fast class takes any converted tokenizer.
        loader = PreTrainedTokenizerFast if rerouted else AutoTokenizer
        tokenizer = loader.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        tokenizer.save_pretrained(out_dir)
        apply_gguf_special_tokens(GGUFReader(str(gguf_path)).fields, out_dir)
    except Exception as exc:  # transformers raises many types for tokenizers it cannot convert
        print(f"{_ERROR_MARK}{type(exc).__name__}: {exc}".replace("\n", " "), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
