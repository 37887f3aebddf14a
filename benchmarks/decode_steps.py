"""Raw decode steps of the batch layout (no sampling, no scheduling), for A/B runs of two checkouts.

    python benchmarks/decode_steps.py [MODEL_DIR] [--rows 1,4,8] [--steps 64] [--prompt 200]

Prints one JSON line: tok/s per row count (each row carries one token per step), the step's
median milliseconds, and the process's peak RSS. MODEL_DIR defaults to the prepared default
model under data/models. Run it from the checkout whose code is measured.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

from kobold_api.engine.decode_batch import new_decode_batch
from kobold_api.engine.onnx_model import OnnxCausalLM


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", nargs="?", default="")
    parser.add_argument("--rows", default="1,4,8")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    model_dir = Path(args.model_dir) if args.model_dir else next(
        path for path in sorted(Path("data/models").glob("SmolLM2-135M-Instruct-*")) if path.is_dir())
    model = OnnxCausalLM(model_dir, "cpu", args.threads)
    results: dict[str, object] = {"model": model_dir.name}
    for rows in (int(value) for value in args.rows.split(",")):
        try:
            batch = new_decode_batch(model, rows, 4096)
        except TypeError:  # a checkout from before fixed slots (no capacity)
            batch = new_decode_batch(model, rows)
        for row in range(rows):
            batch.admit([(7 * i + row) % 1000 + 10 for i in range(args.prompt + row)], None, 0)
        batch.step([11] * rows)  # warm-up
        times = []
        for step in range(args.steps):
            started = time.perf_counter()
            batch.step([(step * 13 + row) % 1000 + 10 for row in range(rows)])
            times.append(time.perf_counter() - started)
        results[f"rows_{rows}_tok_s"] = round(rows * len(times) / sum(times), 1)
        results[f"rows_{rows}_median_ms"] = round(1000 * statistics.median(times), 2)
    results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
