"""Compiled programs on several gloo ranks (loopback, spawned here) equal the reference model."""

from __future__ import annotations

import json
import os
import time
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lcc.compiler.layout import coords, groups
from lcc.compiler.plan import compile_plan
from lcc.model import build_model
from lcc.runtime.rendezvous import host_store, join_group
from lcc.spec import load_spec
from tests.compiler.programs import Ctx, load
from tests.conftest import SPECS

LAYOUTS = {
    "tp2": ["parallelism.tp=2", "parallelism.pp=1", "parallelism.dp=1", "parallelism.ep=1",
            "cluster.gpus_per_node=2", "parallelism.pipeline.microbatches=1"],
    "dp2_ep2": ["parallelism.pp=1", "parallelism.dp=2", "parallelism.ep=2", "cluster.gpus_per_node=2",
                "parallelism.pipeline.microbatches=1"],
    "dp2_tp2_ep4": ["parallelism.pp=1", "parallelism.dp=2", "parallelism.tp=2", "parallelism.ep=4",
                    "cluster.gpus_per_node=4", "parallelism.pipeline.microbatches=1"],
}
TIMEOUT_S = 120


def _shard(full: torch.Tensor, shard: dict | None, c, par) -> torch.Tensor:
    if shard is None:
        return full
    index, size = {"tp": (c.tp, par.tp), "ep": (c.ep, par.ep)}[shard["axis"]]
    part = index * shard["parts"] // size
    return full.chunk(shard["parts"], dim=shard["dim"])[part]


def _worker(rank: int, world: int, port: int, overrides: list[str], out_dir: str) -> None:
    torch.set_num_threads(1)
    join_group("gloo", rank, world, TIMEOUT_S, port)
    try:
        spec = load_spec(SPECS / "tiny-moe.yaml", [*overrides, "train.dtype=float64"])
        par = spec.parallelism
        files = compile_plan(spec)
        plan = json.loads(files["plan.json"])
        c = coords(par, spec.cluster.gpus_per_node, rank)
        mine = {}
        for axis in ("tp", "ep", "dp", "edp"):
            for members in groups(par, axis):
                g = dist.new_group(list(members))
                if rank in members:
                    mine[axis] = g
        model = build_model(spec)
        full = dict(model.named_parameters())
        params = {p["name"]: _shard(full[p["name"]].detach(), p["shard"], c, par).clone().requires_grad_()
                  for p in plan["parameters"]}
        buffers = dict(model.named_buffers())
        ctx = Ctx(spec.routing, tp_rank=c.tp)
        program = load(files["programs/stage0.py"])

        def tokens_of(dp_rank: int) -> torch.Tensor:
            return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(100 + dp_rank))

        logits = program.forward(params, buffers, tokens_of(c.dp), types.SimpleNamespace(**mine), ctx)
        parts = [torch.empty_like(logits) for _ in range(par.tp)]
        dist.all_gather(parts, logits.detach().contiguous(), group=mine["tp"])
        reference = model(tokens_of(c.dp))
        forward_error = float((torch.cat(parts, dim=-1) - reference).abs().max())
        # gradients of sum(logits^2) over every dp rank's tokens: the local shards' gradients, summed over
        # the axes the plan names, equal the matching slices of the reference gradients
        logits.square().sum().backward()
        model.zero_grad()
        sum(model(tokens_of(d)).square().sum() for d in range(par.dp)).backward()
        grad_error = 0.0
        for p in plan["parameters"]:
            grad = params[p["name"]].grad
            grad = torch.zeros_like(params[p["name"]]) if grad is None else grad.clone()
            for axis in p["grad_reduce"]:
                dist.all_reduce(grad, group=mine[axis])
            expected = _shard(full[p["name"]].grad, p["shard"], c, par)
            grad_error = max(grad_error, float((grad - expected).norm() / expected.norm().clamp(min=1e-300)))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"forward_error": forward_error, "grad_error": grad_error}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_programs_on_gloo_ranks_equal_the_reference(layout, tmp_path):
    spec = load_spec(SPECS / "tiny-moe.yaml", LAYOUTS[layout])
    world = spec.parallelism.world_size
    store = host_store()
    context = mp.start_processes(_worker, args=(world, store.port, LAYOUTS[layout], str(tmp_path)), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"ranks did not finish within {TIMEOUT_S} s")
    for rank in range(world):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["forward_error"] < 1e-12, (rank, result)
        assert result["grad_error"] < 1e-9, (rank, result)
