"""ZeRO 1-3 and activation checkpointing run on gloo ranks and compute what the reference computes;
ZeRO-3 ranks hold only their shards between layers; peak memory is measured."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lcc.compiler.output import write
from lcc.compiler.plan import compile_plan
from lcc.runtime.checkpoint_dir import latest
from lcc.runtime.launch import launch, read_metrics
from lcc.runtime.rendezvous import host_store, join_group
from lcc.spec import load_spec
from tests.conftest import SPECS
from tests.layouts import LAYOUTS
from tests.runtime.equivalence import LIGHT, assert_run_matches_reference


def memory_spec(layout: str, zero: int, checkpointing: str, extra: tuple[str, ...] = ()):
    return load_spec(SPECS / "tiny-moe.yaml", [*LIGHT, *LAYOUTS[layout], f"parallelism.zero={zero}",
                                               f"parallelism.activation_checkpointing={checkpointing}", *extra])


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
@pytest.mark.parametrize("zero", [1, 2, 3])
@pytest.mark.parametrize("layout", ["dp2", "pp2_dp2_ep2"])
def test_zero_and_checkpointing_equal_reference(layout, zero, checkpointing, tmp_path, reference, monkeypatch):
    """8 steps: ZeRO's sharded optimizer states, gathers and recomputation act from the first step on, and
    the step's transcript is checked too; the 20-step curves of the layouts are in test_equivalence."""
    spec = memory_spec(layout, zero, checkpointing)
    assert_run_matches_reference(spec, tmp_path, reference, monkeypatch, steps=8)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero3_halves_model_states_with_dp2(tmp_path):
    """Measured with live-tensor tracking: with dp 2 and ZeRO-3 a rank holds half of every parameter,
    gradient and optimizer state; checkpointing lowers the peak above them."""
    measured = {}
    for zero, ckpt in ((0, "none"), (3, "none"), (3, "full")):
        plan = tmp_path / f"plan{zero}{ckpt}"
        write(compile_plan(memory_spec("dp2", zero, ckpt)), plan)
        launch(plan, 2, tmp_path / f"m{zero}{ckpt}.jsonl", quiet=True, track_memory=True)
        measured[zero, ckpt] = read_metrics(tmp_path / f"m{zero}{ckpt}.jsonl")[-1]
    states = {k: m["state_memory_bytes"] for k, m in measured.items()}
    assert 0.45 < states[3, "none"] / states[0, "none"] < 0.55
    activations = {k: m["peak_memory_bytes"] - m["state_memory_bytes"] for k, m in measured.items()}
    assert all(a > 0 for a in activations.values())
    assert activations[3, "full"] < activations[3, "none"]


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("zero", [3])
def test_zero_resume_equals_uninterrupted(zero, tmp_path):
    plan = tmp_path / "plan"
    write(compile_plan(memory_spec("dp2", zero, "none", ("train.checkpoint_every=2",))), plan)
    launch(plan, 4, tmp_path / "straight.jsonl", quiet=True)
    launch(plan, 2, tmp_path / "first.jsonl", quiet=True, checkpoints=tmp_path / "ckpt")
    assert latest(tmp_path / "ckpt").name == "step-000002"
    launch(plan, 4, tmp_path / "first.jsonl", quiet=True, checkpoints=tmp_path / "ckpt", resume=True)
    assert [m["loss"] for m in read_metrics(tmp_path / "first.jsonl")] == \
        [m["loss"] for m in read_metrics(tmp_path / "straight.jsonl")]


def _probe_rank(rank: int, plan_dir: str, port: int, out: str) -> None:
    """One training step of a ZeRO-3 plan, recording which gathered copies are alive at the start of
    each program function (that is, between layers) and after forward and backward."""
    import lcc.ops as ops
    from lcc.ops.zero import live_gathered
    from lcc.runtime.engine import RankEngine

    torch.set_num_threads(1)
    join_group("gloo", rank, 2, 60, port)
    seen = []
    gather = ops.zero_gather

    def probe(P, params, G, ctx):
        time.sleep(0.01)  # gloo's worker thread lets go of a finished collective's buffers a moment later
        seen.append((sorted(live_gathered()), sorted(params), ctx.recomputing))
        return gather(P, params, G, ctx)

    ops.zero_gather = probe
    try:
        engine = RankEngine(Path(plan_dir), rank)
        shapes = {n: (p.numel(), engine.layout.numel(n)) for n, p in engine.params.items()}
        engine.train_step(0)
        time.sleep(0.01)
        after = sorted(live_gathered())
        torch.save({"seen": seen, "after": after, "shapes": shapes}, Path(out) / f"probe{rank}.pt")
    finally:
        ops.zero_gather = gather
        dist.destroy_process_group()


def _layer(name: str) -> str:
    return ".".join(name.split(".")[:2]) if name.startswith("layers.") else name


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
def test_zero3_ranks_hold_only_shards_between_layers(checkpointing, tmp_path):
    plan = tmp_path / "plan"
    write(compile_plan(memory_spec("dp2", 3, checkpointing)), plan)
    store = host_store()
    context = mp.start_processes(_probe_rank, args=(str(plan), store.port, str(tmp_path)), nprocs=2, join=False,
                                 start_method="spawn")
    assert context.join(timeout=100) or context.join(timeout=10)
    for rank in range(2):
        probe = torch.load(tmp_path / f"probe{rank}.pt")
        for numel, full in probe["shapes"].values():
            assert numel == -(-full // 2)  # each parameter: its half, rounded up (the last piece padded)
        assert probe["seen"], "the program gathered nothing"
        for alive, mine, _ in probe["seen"]:
            # at the start of a function only its own layer's parameters (prefetched by the previous
            # function, or gathered by the layer a recomputed part belongs to) are alive
            layers = {_layer(n) for n in mine}
            assert {_layer(n) for n in alive} <= layers, (alive, mine)
        assert probe["after"] == []  # after backward and the step: nothing but shards
        if checkpointing == "full":
            assert any(recomputing for *_, recomputing in probe["seen"])  # backward re-gathers by recomputing
