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
    if add_bos is False or add_bos == 0:
        tokenizer_json["post_processor"] = None
        config["add_bos_token"] = False
    eos_id = gguf_value(fields, "tokenizer.ggml.eos_token_id")
    if isinstance(eos_id, int) and eos_id in vocab:
        config["eos_token"] = vocab[eos_id]
    tokenizer_path.write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2))


def main(argv: list[str]) -> int:
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    gguf_path, out_dir = Path(argv[0]), Path(argv[1])
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        tokenizer.save_pretrained(out_dir)
        apply_gguf_special_tokens(GGUFReader(str(gguf_path)).fields, out_dir)
    except Exception as exc:  # transformers raises many types for tokenizers it cannot convert
        print(f"{_ERROR_MARK}{type(exc).__name__}: {exc}".replace("\n", " "), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
