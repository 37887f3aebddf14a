"""The step profile that tells where a decode step's time goes (run on the GPU by gpu_check.sh)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kobold_api.engine.profile import profile_steps

pytestmark = pytest.mark.fast


def test_the_profile_sums_the_measured_steps_only(tiny_model_dir: Path) -> None:
    report = profile_steps(tiny_model_dir, "cpu", rows=2, steps=3, prompt_tokens=20, cpu_threads=2)
    assert report["runs_traced"] == 3 and report["rows"] == 2 and report["provider"] == "cpu"
    assert report["memcpy_nodes_per_run"] == 0
    ops = report["top_ops_ms_per_run"]
    assert "GroupQueryAttention" in ops and ("MatMulNBits" in ops or "MatMul" in ops)
    # Whole runs are counted: the same nodes each run (a window cutting a run would not divide).
    assert float(report["nodes_per_run"]).is_integer() and report["nodes_per_run"] > 10
    assert 0 < report["kernel_ms_per_run"] <= report["step_ms"]
