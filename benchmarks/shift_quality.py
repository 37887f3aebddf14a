#!/usr/bin/env python3
"""What a context shift costs in quality on the default model, next to what the one-token
decode kernels already cost against a prefill.

For ten chats (a ~200-token card, fourteen ~70-token messages, a new user message), the oldest
1-4 messages are dropped; the next-token distribution after a shift of the cached chat is
compared with a fresh prefill of the shortened prompt (max logit difference relative to the
largest logit, KL divergence in nats, top-1 agreement). The same figures for a prompt whose
last token runs through the one-token kernels after a prefill of the rest. Run::

    .venv/bin/python benchmarks/shift_quality.py
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (the word list)

from kobold_api.engine.context_shift import ContextShifter, plan_shift  # noqa: E402
from kobold_api.engine.onnx_model import OnnxCausalLM  # noqa: E402
from kobold_api.engine.prepare import prepare_model  # noqa: E402
from kobold_api.engine.tokenizer import Tokenizer  # noqa: E402

TRIALS = 10


def compare_logits(a: np.ndarray, b: np.ndarray) -> tuple[float, float, bool]:
    """(relative max difference, KL(b || a), same top token) of logits ``a`` against ``b``."""
    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x.astype(np.float64) - x.max())
        return e / e.sum()

    pa, pb = softmax(a), softmax(b)
    kl = float((pb * (np.log(pb + 1e-30) - np.log(pa + 1e-30))).sum())
    return float(np.abs(a - b).max() / np.abs(b).max()), kl, bool(a.argmax() == b.argmax())


def main() -> None:
    model_dir = prepare_model("default", "cpu", compare.DATA_DIR / "models")
    model, tokenizer = OnnxCausalLM(model_dir, "cpu", cpu_threads=2), Tokenizer(model_dir)
    assert model.rotary is not None
    rng = random.Random(3)
    shifted, kernels = [], []
    for _ in range(TRIALS):
        card = tokenizer.encode("<|im_start|>system\nYou are Mira, a lighthouse keeper. "
                                + compare._text(rng, 150) + "<|im_end|>\n")
        messages = [tokenizer.encode(f"<|im_start|>{'user' if i % 2 == 0 else 'assistant'}\n"
                                     + compare._text(rng, 60) + "<|im_end|>\n") for i in range(14)]
        new = tokenizer.encode("<|im_start|>user\n" + compare._text(rng, 20) + "<|im_end|>\n<|im_start|>assistant\n")
        drop = rng.randint(1, 4)
        cache = model.new_cache()
        model.forward(card + sum(messages, []), cache)
        prompt = card + sum(messages[drop:], []) + new
        plan = plan_shift(np.array(cache.token_ids), np.array(prompt), len(prompt) - 2)
        moved = ContextShifter(model.rotary, "cpu").shifted_copy(cache, plan, prompt)
        fresh = model.forward(prompt, model.new_cache())
        shifted.append(compare_logits(model.forward(prompt[plan.reused:], moved), fresh))
        split = model.new_cache()
        model.forward(prompt[:-1], split)
        kernels.append(compare_logits(model.forward(prompt[-1:], split), fresh))
    print("| next token after | rel. max logit diff (median / max) | KL, nats (median / max) | same top token |")
    print("|---|---:|---:|---:|")
    for name, rows in (("a shift (1-4 oldest messages dropped)", shifted),
                       ("the one-token kernels (last token decoded)", kernels)):
        rel, kl, same = zip(*rows)
        print(f"| {name} | {np.median(rel):.3f} / {max(rel):.3f} | {np.median(kl):.4f} / {max(kl):.4f} "
              f"| {sum(same)}/{len(same)} |")


if __name__ == "__main__":
    main()
