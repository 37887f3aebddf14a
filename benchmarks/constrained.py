#!/usr/bin/env python3
"""Decode speed with a JSON-schema constraint against the same decode without one.

The default model (SmolLM2-135M-Instruct, int4, CPU provider, 2 threads), one sequence at a
time, 128 new tokens per run, SillyTavern-like sampling (temperature 0.7, top-p 0.92). The
constrained runs use a schema that cannot end early (an array of at least 40 strings), so both
sides decode the same number of tokens; the figure is the engine's decode tok/s (prefill
excluded), the median of ``--runs`` runs after one warm-up each. Also reported: the grammar's
compile time and the per-token cost of computing and applying the mask alone.

    .venv/bin/python benchmarks/constrained.py [--runs 5]

Prints a table and writes ``benchmarks/results/constrained.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kobold_api.engine.constraints import Constraint  # noqa: E402
from kobold_api.engine.generation import GenerationRequest, TextGenerator  # noqa: E402
from kobold_api.engine.onnx_model import OnnxCausalLM  # noqa: E402
from kobold_api.engine.prepare import prepare_model  # noqa: E402
from kobold_api.engine.sampling import SamplingParams  # noqa: E402
from kobold_api.engine.tokenizer import Tokenizer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "constrained.json"
SCHEMA = {"type": "array", "minItems": 40, "items": {"type": "string", "maxLength": 24}}
PROMPT = ("<|im_start|>user\nList forty animals as a JSON array of strings.<|im_end|>\n"
          "<|im_start|>assistant\n")
TOKENS = 128


def decode_rate(generator: TextGenerator, constraint: Constraint | None, seed: int) -> tuple[float, int]:
    result = generator.generate(GenerationRequest(
        prompt=PROMPT, max_new_tokens=TOKENS, constraint=constraint, ban_eos=constraint is None,
        sampling=SamplingParams(temperature=0.7, top_p=0.92, seed=seed)))
    return result.completion_tokens / result.decode_seconds, result.completion_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    model_dir = prepare_model("default", "cpu", ROOT / "data" / "models")
    generator = TextGenerator(OnnxCausalLM(model_dir, "cpu", cpu_threads=2), Tokenizer(model_dir))
    started = time.perf_counter()
    constraint = Constraint.from_json_schema(SCHEMA)
    compile_ms = (time.perf_counter() - started) * 1000
    generator.grammar_vocabulary.tokenizer  # built once per model, outside the timings
    rows: dict[str, list[float]] = {"unconstrained": [], "json_schema": []}
    tokens: dict[str, list[int]] = {"unconstrained": [], "json_schema": []}
    for name, spec in (("unconstrained", None), ("json_schema", constraint)):
        decode_rate(generator, spec, seed=0)  # warm-up
    for run in range(args.runs):  # interleaved, so drift hits both alike
        for name, spec in (("unconstrained", None), ("json_schema", constraint)):
            rate, count = decode_rate(generator, spec, seed=run + 1)
            rows[name].append(rate)
            tokens[name].append(count)
    # The mask alone: compute and apply it for one step, on the model's logits width.
    guide = generator.grammar_vocabulary.guide(constraint)
    logits = np.random.default_rng(0).standard_normal(generator.model.vocab_size).astype(np.float32)
    repeats = 200
    started = time.perf_counter()
    for _ in range(repeats):
        guide.mask(logits)
    mask_us = (time.perf_counter() - started) / repeats * 1e6
    medians = {name: statistics.median(values) for name, values in rows.items()}
    summary = {
        "model": "SmolLM2-135M-Instruct int4, CPU provider, 2 threads", "new_tokens": TOKENS, "runs": args.runs,
        "decode_tok_s": {name: round(value, 1) for name, value in medians.items()},
        "all_runs_tok_s": {name: [round(v, 1) for v in values] for name, values in rows.items()},
        "tokens": tokens, "constrained_vs_free": round(medians["json_schema"] / medians["unconstrained"], 3),
        "schema_compile_ms": round(compile_ms, 2), "mask_us_per_token": round(mask_us, 1),
    }
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"| decode | tok/s (median of {args.runs}) |\n|---|---|")
    for name, value in medians.items():
        print(f"| {name} | {value:.1f} |")
    print(f"constrained / free = {summary['constrained_vs_free']:.3f}; schema compile {compile_ms:.2f} ms; "
          f"mask {mask_us:.0f} us per token")


if __name__ == "__main__":
    main()
