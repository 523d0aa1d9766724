"""Running a compiled plan on gloo ranks and comparing it with the single-process reference (float64)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lcc.compiler.layout import coords
from lcc.compiler.output import write
from lcc.compiler.plan import compile_plan
from lcc.model.trainer import ReferenceTrainer
from lcc.runtime import transcript
from lcc.runtime.launch import launch, read_metrics
from lcc.spec import Spec
from tests.runtime.transcript_oracle import check_rank

# float64, short sequences, 16 experts in 4 groups (4 per EP rank at ep 4)
SMALL = ["train.dtype=float64", "train.seq_len=32", "train.global_batch=16", "train.optimizer.warmup_steps=2",
         "model.moe.n_experts=16", "model.moe.n_groups=4"]
# and two micro-batches, for the longer lists of runs
LIGHT = [*SMALL, "parallelism.pipeline.microbatches=2"]
STEPS = 20


class References:
    """Reference runs by model, training settings and units per step: the reference trainer reads
    nothing else of the layout (dp x micro-batches units make a step, docs/model.md)."""

    def __init__(self) -> None:
        self.cache: dict[str, tuple] = {}

    def __call__(self, spec: Spec) -> tuple[list[float], dict[str, torch.Tensor], list[dict]]:
        par = spec.parallelism
        units = par.dp * par.pipeline.microbatches
        key = spec.model_dump_json(exclude={"parallelism", "cluster"}) + f"/units={units}"
        if key not in self.cache:
            trainer = ReferenceTrainer(spec, keep_grads=True)
            losses, grads, loads = [], None, []
            for step in range(STEPS):
                record = trainer.train_step(step)
                losses.append(record["loss"])
                loads.append({f"layers.{i}.ffn": r["load_per_expert"] for i, r in record["router"].items()})
                if step == 0:
                    grads = trainer.last_grads
            self.cache[key] = (losses, grads, loads)
        return self.cache[key]


def assert_run_matches_reference(spec: Spec, tmp_path: Path, reference: References, monkeypatch,
                                 steps: int = STEPS) -> None:
    """20-step (or `steps`) losses within 1e-8, identical expert loads every layer and step, every rank's step-1
    gradients (whole local tensors) within 1e-9 of the reference's, per parameter, and every rank's
    collectives in a step as the plan lists them."""
    plan_dir = tmp_path / "plan"
    write(compile_plan(spec), plan_dir)
    monkeypatch.setenv("LCC_DUMP_GRADS", str(tmp_path))
    launch(plan_dir, steps, tmp_path / "metrics.jsonl", quiet=True, transcript=tmp_path / "transcript.jsonl")
    records = read_metrics(tmp_path / "metrics.jsonl")
    ref_losses, ref_grads, ref_loads = reference(spec)
    assert [m["loss"] for m in records] == pytest.approx(ref_losses[:steps], rel=1e-8, abs=0)
    assert [{site: r["load_per_expert"] for site, r in m["router"].items()} for m in records] == ref_loads[:steps]
    plan = assert_rank_grads(spec, plan_dir, tmp_path, ref_grads)
    par = spec.parallelism
    # and the collectives of step 2 (step 1 also gathers whole gradients for the comparison above) are
    # exactly what the plan lists, on every rank
    issued = transcript.read(tmp_path / "transcript.jsonl")
    for rank in range(par.world_size):
        check_rank(plan, issued, rank, step=1)


def assert_rank_grads(spec: Spec, plan_dir: Path, dumped: Path, full_grads: dict[str, torch.Tensor]) -> dict:
    """Every rank's step-1 gradients (whole local tensors, dumped by LCC_DUMP_GRADS into `dumped`) within
    1e-9 (norm-relative, per parameter) of the matching slice of `full_grads` (global names and shapes).
    Returns the plan."""
    par = spec.parallelism
    plan = json.loads((plan_dir / "plan.json").read_text())
    sizes = {"tp": par.tp, "ep": par.ep}
    checked = 0
    for rank in range(par.world_size):
        c = coords(par, spec.cluster.gpus_per_node, rank)
        local_grads = torch.load(dumped / f"grads_rank{rank}.pt")
        for p in plan["parameters"]:
            local = local_grads.get(p["name"])
            if local is None:
                continue
            part = full_grads[p["name"]]
            if p["shard"] is not None:
                index = {"tp": c.tp, "ep": c.ep}[p["shard"]["axis"]] * p["shard"]["parts"] // sizes[p["shard"]["axis"]]
                part = part.chunk(p["shard"]["parts"], dim=p["shard"]["dim"])[index]
            error = (local - part).norm() / part.norm().clamp(min=1e-300)
            assert error <= 1e-9 or (local - part).norm() == 0, (p["name"], rank, float(error))
            checked += 1
    assert checked >= len(plan["parameters"])
    return plan
