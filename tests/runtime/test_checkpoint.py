"""Resuming from a checkpoint equals an uninterrupted run, step for step."""

from __future__ import annotations

import pytest

from lcc.compiler.output import write
from lcc.compiler.plan import compile_plan
from lcc.runtime.checkpoint import latest
from lcc.runtime.launch import launch, read_metrics
from lcc.spec import load_spec
from tests.conftest import SPECS

LAYOUT = ["parallelism.pp=2", "parallelism.dp=2", "parallelism.ep=2", "cluster.gpus_per_node=4",
          "train.seq_len=32", "train.global_batch=16", "train.dtype=float64", "train.checkpoint_every=2",
          "model.moe.n_experts=16", "model.moe.n_groups=4"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_resume_equals_uninterrupted(tmp_path):
    plan = tmp_path / "plan"
    write(compile_plan(load_spec(SPECS / "tiny-moe.yaml", LAYOUT)), plan)
    launch(plan, 4, tmp_path / "straight.jsonl", quiet=True)
    launch(plan, 3, tmp_path / "first.jsonl", quiet=True, checkpoints=tmp_path / "ckpt")
    assert latest(tmp_path / "ckpt").name == "step-000003"
    assert (tmp_path / "ckpt" / "step-000002").is_dir()  # every 2 steps, and at the end
    launch(plan, 4, tmp_path / "first.jsonl", quiet=True, checkpoints=tmp_path / "ckpt", resume=True)
    straight = [m["loss"] for m in read_metrics(tmp_path / "straight.jsonl")]
    resumed = read_metrics(tmp_path / "first.jsonl")
    assert [m["step"] for m in resumed] == [0, 1, 2, 3]
    assert [m["loss"] for m in resumed] == straight  # bitwise: same shards, moments, biases, data position


def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path):
    (tmp_path / "step-000002").mkdir()
    (tmp_path / "latest").write_text("step-000002\n")
    (tmp_path / "step-000004.tmp").mkdir()  # a save that crashed before its rename
    assert latest(tmp_path) == tmp_path / "step-000002"
    assert latest(tmp_path / "missing") is None
