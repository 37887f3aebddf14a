#!/usr/bin/env python3
"""What classifier-free guidance costs: decode tok/s with ``guidance_scale`` 1 (off) and 1.5.

On the default model (SmolLM2-135M-Instruct, int4, CPU, prepared under ``data/models``), in the
engine (no HTTP), one request at a time: greedy, EOS banned, ``--tokens`` tokens after a short
prompt, the median of ``--runs`` runs after one warm-up. A guided request runs a second forward
pass per token for its negative context, so about half the speed is expected.

    .venv/bin/python benchmarks/guidance.py [--tokens 128] [--runs 3]

Prints a table and writes ``benchmarks/results/guidance.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from kobold_api.engine.engine import Engine
from kobold_api.engine.generation import GenerationRequest
from kobold_api.engine.prepare import prepare_model
from kobold_api.engine.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Once upon a time, in a village by the sea, there lived an old fisherman who"
NEGATIVE = "A boring story."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    model_dir = prepare_model("default", "cpu", ROOT / "data" / "models")
    engine = Engine.load(str(model_dir), "cpu", model_dir.parent, cpu_threads=os.cpu_count() or 1,
                         max_batch_size=1)

    def rate(scale: float) -> float:
        request = GenerationRequest(prompt=PROMPT, max_new_tokens=args.tokens, ban_eos=True, sampling=SamplingParams(
            temperature=0.0, rep_pen=1.0, guidance_scale=scale, negative_prompt=NEGATIVE))
        result = engine.generator.generate(request)
        return result.completion_tokens / result.decode_seconds

    rows = {}
    try:
        for scale in (1.0, 1.5):
            rate(scale)  # warm-up
            rows[str(scale)] = statistics.median(rate(scale) for _ in range(args.runs))
    finally:
        engine.shutdown()
    print("| guidance_scale | decode tok/s |\n|---|---|")
    for scale, value in rows.items():
        print(f"| {scale} | {value:.1f} |")
    print(f"guided / plain: {rows['1.5'] / rows['1.0']:.2f}x")
    out = ROOT / "benchmarks" / "results" / "guidance.json"
    out.write_text(json.dumps({"tokens": args.tokens, "runs": args.runs, "decode_tok_s": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
