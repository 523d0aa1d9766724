"""Compiled plans run on gloo ranks compute what the single-process reference computes (float64)."""

from __future__ import annotations

import os

import pytest
import torch

from lcc.compiler.layout import coords
from lcc.compiler.output import write
from lcc.compiler.plan import compile_plan
from lcc.model.trainer import ReferenceTrainer
from lcc.runtime.launch import launch, read_metrics
from lcc.runtime.shards import part_index
from lcc.spec import load_spec
from tests.conftest import SPECS
from tests.layouts import LAYOUTS

SMALL = ["train.dtype=float64", "train.seq_len=32", "train.global_batch=16", "train.optimizer.warmup_steps=2"]
STEPS = 20


@pytest.fixture(scope="module")
def reference():
    cache = {}

    def run(spec):
        key = spec.model_dump_json()
        if key not in cache:
            trainer = ReferenceTrainer(spec, keep_grads=True)
            losses, grads, loads = [], None, []
            for step in range(STEPS):
                record = trainer.train_step(step)
                losses.append(record["loss"])
                loads.append({f"layers.{i}.ffn": r["load_per_expert"] for i, r in record["router"].items()})
                if step == 0:
                    grads = trainer.last_grads
            cache[key] = (losses, grads, loads)
        return cache[key]

    return run


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_equals_reference(layout, tmp_path, reference, monkeypatch):
    spec = load_spec(SPECS / "tiny-moe.yaml", [*SMALL, *LAYOUTS[layout]])
    plan_dir = tmp_path / "plan"
    write(compile_plan(spec), plan_dir)
    monkeypatch.setenv("LCC_DUMP_GRADS", str(tmp_path))
    launch(plan_dir, STEPS, tmp_path / "metrics.jsonl", quiet=True)
    records = read_metrics(tmp_path / "metrics.jsonl")
    ref_losses, ref_grads, ref_loads = reference(spec)
    assert [m["loss"] for m in records] == pytest.approx(ref_losses, rel=1e-8, abs=0)
    # routing decisions: every expert's load, every layer, every step
    assert [{site: r["load_per_expert"] for site, r in m["router"].items()} for m in records] == ref_loads
    # step-1 gradients, reassembled from every rank's shards, per parameter
    par = spec.parallelism
    import json

    plan = json.loads((plan_dir / "plan.json").read_text())
    sizes = {"tp": par.tp, "ep": par.ep}
    for p in plan["parameters"]:
        expected = ref_grads[p["name"]]
        for rank in range(par.world_size):
            c = coords(par, spec.cluster.gpus_per_node, rank)
            local = torch.load(tmp_path / f"grads_rank{rank}.pt").get(p["name"])
            if local is None:
                continue
            part = expected
            if p["shard"] is not None:
                index = part_index(p["shard"], {"tp": c.tp, "ep": c.ep}, sizes)
                part = expected.chunk(p["shard"]["parts"], dim=p["shard"]["dim"])[index]
            error = (local - part).norm() / part.norm().clamp(min=1e-300)
            assert error <= 1e-9 or (local - part).norm() == 0, (p["name"], rank, float(error))
    assert os.path.exists(tmp_path / "grads_rank0.pt")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_float32_step_one(tmp_path):
    overrides = [o for o in SMALL if "dtype" not in o] + LAYOUTS["dp2_tp2_ep4"]
    spec = load_spec(SPECS / "tiny-moe.yaml", overrides)
    plan_dir = tmp_path / "plan"
    write(compile_plan(spec), plan_dir)
    launch(plan_dir, 1, tmp_path / "metrics.jsonl", quiet=True)
    loss = read_metrics(tmp_path / "metrics.jsonl")[0]["loss"]
    assert loss == pytest.approx(ReferenceTrainer(spec).train_step(0)["loss"], rel=1e-5)
