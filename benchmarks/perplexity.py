"""Perplexity of a prepared ONNX model on a text: how much a quantization choice costs.

Why this exists: the default model is re-quantized from a GGUF for ONNX Runtime's kernels, and
speed comparisons with llama.cpp only mean something if the two models are about as good. The
text is fed one token at a time through the engine's own decode path (the graph keeps only the
last position's logits), so this measures exactly what the server runs.

    python benchmarks/perplexity.py TEXT_FILE [MODEL_DIR ...] [--chars 6000] [--tokens 700]
    # the GGUF itself, with the benchmark venv's llama-cpp-python (and llama.cpp's tokenizer):
    .bench/bin/python benchmarks/perplexity.py TEXT_FILE --gguf data/models/downloads/SmolLM2-135M-Instruct.Q4_1.gguf

Without MODEL_DIR or --gguf it prepares (or finds in data/models) the default model. Both
tokenizers are the GGUF's vocabulary; the token counts printed show that they agree.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def mean_nll(logits_per_position: list[np.ndarray], ids: list[int]) -> float:
    """Mean negative log-likelihood of ``ids[1:]`` given the logits after each earlier token."""
    total = 0.0
    for logits, target in zip(logits_per_position, ids[1:]):
        row = np.asarray(logits, dtype=np.float64).ravel()
        row = row - row.max()
        total += math.log(np.exp(row).sum()) - row[target]
    return total / (len(ids) - 1)


def score_onnx(model_dir: Path, text: str, max_tokens: int) -> tuple[list[int], list[np.ndarray]]:
    from kobold_api.engine.onnx_model import OnnxCausalLM
    from kobold_api.engine.tokenizer import Tokenizer

    ids = Tokenizer(model_dir).encode(text)[:max_tokens]
    model = OnnxCausalLM(model_dir, "cpu")
    cache = model.new_cache()
    return ids, [model.forward([token], cache) for token in ids[:-1]]


def score_gguf(gguf: Path, text: str, max_tokens: int) -> tuple[list[int], list[np.ndarray]]:
    from llama_cpp import Llama

    llm = Llama(str(gguf), n_ctx=max(512, max_tokens + 8), logits_all=True, verbose=False)
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False)[:max_tokens]
    llm.eval(ids)
    return ids, [np.array(row) for row in llm.scores[: len(ids) - 1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("text", type=Path, help="a UTF-8 text file")
    parser.add_argument("models", nargs="*", type=Path, help="prepared model folders (default: the default model)")
    parser.add_argument("--gguf", type=Path, help="also score this GGUF with llama-cpp-python")
    parser.add_argument("--chars", type=int, default=6000, help="characters read from the text")
    parser.add_argument("--tokens", type=int, default=700, help="tokens scored")
    args = parser.parse_args()

    text = args.text.read_text(encoding="utf-8")[: args.chars]
    models = list(args.models)
    if not models and not args.gguf:
        from kobold_api.engine.prepare import prepare_model

        models = [prepare_model("default", "cpu", REPO / "data" / "models", progress=print)]
    runs = [(str(model), lambda model=model: score_onnx(model, text, args.tokens)) for model in models]
    if args.gguf:
        runs.append((f"llama.cpp {args.gguf.name}", lambda: score_gguf(args.gguf, text, args.tokens)))
    for name, score in runs:
        ids, logits = score()
        nll = mean_nll(logits, ids)
        print(f"{name}: {len(ids)} tokens, mean NLL {nll:.4f}, perplexity {math.exp(nll):.2f}")


if __name__ == "__main__":
    main()
