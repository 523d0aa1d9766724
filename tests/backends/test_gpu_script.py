"""benchmarks/gpu/run.sh on a machine without a GPU says what it could not do; its kernel benchmark runs
end to end in Triton's interpreter (a dry run, so that the script a GPU session runs once has run)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed"),
              pytest.mark.skipif(torch.cuda.is_available(), reason="checks the script's behaviour without a GPU")]


def test_without_a_gpu_each_section_says_it_is_pending(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "kernel checks: PENDING (no CUDA device" in done.stdout
    assert "runtime (train, generate on CUDA): PENDING (no CUDA device" in done.stdout
    assert json.loads((tmp_path / "kernels_check.json").read_text())["status"] == "pending"
    assert json.loads((tmp_path / "runtime.json").read_text())["status"] == "pending"


def test_the_kernel_benchmark_runs_in_the_interpreter(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu.kernels", "--interpret", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    check = json.loads((tmp_path / "kernels_check.json").read_text())
    assert check["ok"] and {c["kernel"] for c in check["checks"]} == {"align", "align_segments", "fused_moe",
                                                                        "swiglu_segments"}
    speed = json.loads((tmp_path / "kernels_speed.json").read_text())
    assert {r["rows"] for r in speed["rows"]} == {4, 70}
    assert set(speed["rows"][0]["ms"]) == {"lcc_int4", "lcc_bf16", "torch_grouped_mm_bf16", "torch_reference_int4"}
    table = subprocess.run([sys.executable, "-m", "benchmarks.gpu.table", str(tmp_path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert "6/6 within tolerance" in table.stdout and "rooflines" in table.stdout


def test_the_kernels_compile_for_hopper():
    """The compiled kernels (not the interpreter's): int4 at decode and prefill tiles, and the alignment, built
    for sm_90 with Triton's own compiler, within shared memory and without spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu.compile_sm90", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    prefill = next(line for line in done.stdout.splitlines() if line.startswith("gate_up prefill int4"))
    assert "wgmma 0 " not in prefill  # Hopper's warpgroup matrix instructions at prefill tiles
