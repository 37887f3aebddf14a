#!/usr/bin/env python3
"""The differential test of constrained generation, run longer: random grammars and JSON
schemas (the same generators as ``tests/test_constrained_differential.py``), each generated on
the tiny test model under six sampler settings at once and judged by our own recognisers.

    .venv/bin/python benchmarks/constrained_fuzz.py [--cases 500] [--seed 0]

Prints the cases tried, how the replies ended, and every failure (exit 1 if any).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from hypothesis import HealthCheck, given, seed as hypothesis_seed, settings  # noqa: E402

from constrained_cases import grammar_case, grammars, json_schemas, run_case, schema_case  # noqa: E402
from kobold_api.engine.engine import Engine  # noqa: E402
from kobold_api.engine.prepare import prepare_model  # noqa: E402
from tiny_model import build_tiny_hf_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=500, help="grammars, and as many schemas")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="constrained-fuzz-"))
    model_dir = prepare_model(str(build_tiny_hf_model(root / "hf")), "cpu", root / "cache")
    engine = Engine.load(str(model_dir), "cpu", root / "cache", cpu_threads=2, max_batch_size=8, prefix_cache_mb=0)
    counts: dict[str, collections.Counter] = {}
    failures: list[str] = []
    started = time.perf_counter()

    def record(kind: str, case_factory, value) -> None:
        try:
            case = case_factory(value)
        except Exception as exc:  # a constraint the server refuses is a finding too
            failures.append(f"{kind}: refused: {exc}\n  {value!r}")
            return
        ends, found = run_case(engine, case, seed=len(repr(value)))
        counts.setdefault(kind, collections.Counter())["cases"] += 1
        counts[kind].update(ends)
        failures.extend(found)

    options = settings(max_examples=args.cases, deadline=None, database=None,
                       suppress_health_check=list(HealthCheck))

    @options
    @hypothesis_seed(args.seed)
    @given(grammars())
    def grammar_cases(grammar) -> None:
        record("grammars", grammar_case, grammar)

    @options
    @hypothesis_seed(args.seed)
    @given(json_schemas())
    def schema_cases(schema) -> None:
        record("json schemas", schema_case, schema)

    try:
        grammar_cases()
        schema_cases()
    finally:
        engine.shutdown()
    seconds = time.perf_counter() - started
    for kind, counter in counts.items():
        replies = sum(value for key, value in counter.items() if key != "cases")
        ends = ", ".join(f"{key} {value}" for key, value in sorted(counter.items()) if key != "cases")
        print(f"{kind}: {counter['cases']} cases, {replies} replies judged ({ends})")
    print(f"failures: {len(failures)} in {seconds:.0f} s")
    for failure in failures[:20]:
        print(" -", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
