"""Where a decode step's time goes: ONNX Runtime's per-node profile of a few raw steps.

``profile_steps(model_dir, provider, rows)`` opens the model with profiling on, runs a prefill
and ``steps`` decode steps of ``rows`` rows in the engine's own batch layout, and sums the
trace: time per operator type, how many nodes each execution provider ran, Memcpy nodes (what
blocks CUDA graph capture), and the kernels' share of the step's wall time (the rest is the
launch and framework overhead a captured graph removes). ``kobold-api profile`` prints it.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

from .decode_batch import new_decode_batch
from .onnx_model import OnnxCausalLM


def profile_steps(model_dir: Path, provider: str = "auto", rows: int = 1, steps: int = 16,
                  prompt_tokens: int = 128, cpu_threads: int = 0, kv_layout: str = "auto") -> dict:
    with tempfile.TemporaryDirectory() as work:
        model = OnnxCausalLM(model_dir, provider, cpu_threads, profile_prefix=str(Path(work) / "trace"),
                             kv_layout=kv_layout)
        wall_s = raw_steps(model, rows, steps, prompt_tokens)  # the summary reads only the last ``steps`` runs
        trace = Path(model.session.end_profiling())
        events = json.loads(trace.read_text())
    report = summarize(events, rows, steps, wall_s, model.provider)
    report["layout"] = model.decode_layout
    return report


def raw_steps(model: OnnxCausalLM, rows: int, steps: int, prompt_tokens: int = 128) -> float:
    """Seconds of ``steps`` decode steps of ``rows`` rows in the engine's batch layout (after a
    prefill of ``prompt_tokens`` per row and one warm-up step): the kernels alone, no sampling
    and no scheduling."""
    batch = new_decode_batch(model, rows)
    for row in range(rows):
        batch.admit([(11 * i + row) % 1000 + 5 for i in range(prompt_tokens)], None, 0)
    batch.step([7] * rows)
    began = time.perf_counter()
    for step in range(steps):
        batch.step([(step + row) % 1000 + 5 for row in range(rows)])
    return time.perf_counter() - began


def summarize(events: list[dict], rows: int, steps: int, wall_s: float, provider: str) -> dict:
    """Sum the node events of a profile's last ``steps`` runs (the measured decode steps)."""
    runs = sorted((event for event in events if event.get("cat") == "Session" and event.get("name") == "model_run"),
                  key=lambda event: event["ts"])[-steps:]
    if not runs:
        raise ValueError("the profile holds no model run")
    first, last = runs[0]["ts"], runs[-1]["ts"] + runs[-1].get("dur", 0)
    by_op: dict[str, float] = defaultdict(float)
    count_by_op: Counter[str] = Counter()
    by_provider: Counter[str] = Counter()
    memcpy = 0
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        if not first <= event["ts"] <= last:
            continue
        args = event.get("args", {})
        op = args.get("op_name", "?")
        by_op[op] += event.get("dur", 0)
        count_by_op[op] += 1
        by_provider[args.get("provider", "?")] += 1
        if op.startswith("Memcpy"):
            memcpy += 1
    count = len(runs)
    kernel_us = sum(by_op.values())
    step_us = 1e6 * wall_s / steps
    return {
        "provider": provider, "rows": rows, "steps": steps, "runs_traced": count,
        "step_ms": round(step_us / 1000, 3), "tok_s": round(rows * steps / wall_s, 1),
        "kernel_ms_per_run": round(kernel_us / count / 1000, 3),
        "nodes_per_run": round(sum(count_by_op.values()) / count, 1),
        "memcpy_nodes_per_run": round(memcpy / count, 2),
        "nodes_by_provider": dict(by_provider),
        "top_ops_ms_per_run": {op: round(us / count / 1000, 3)
                               for op, us in sorted(by_op.items(), key=lambda item: -item[1])[:12]},
    }
