"""Each pass on its own, through the state it fills."""

from __future__ import annotations

import json

from lcc.compiler.passes import (
    data_parallel,
    expert_placement,
    memory,
    moe_lowering,
    partition,
    quantize,
    tensor_parallel,
)
from lcc.compiler.plan import compile_plan
from lcc.compiler.state import CompileState
from lcc.compiler.trace import trace
from lcc.spec import load_spec
from tests.conftest import SPECS


def state(*overrides: str, mode: str = "train", spec: str = "tiny-moe") -> CompileState:
    s = load_spec(SPECS / f"{spec}.yaml", list(overrides))
    return CompileState(s, mode, trace(s))


def run(st: CompileState, *passes) -> CompileState:
    for p in passes:
        p.run(st)
    return st


def test_trace_keeps_call_sites():
    targets = [n.target for n in trace(load_spec(SPECS / "tiny-moe.yaml")).graph.nodes if n.op == "call_module"]
    for site in ("embed", "layers.0.attn.wq", "layers.0.attn.core", "layers.0.ffn.router", "layers.0.ffn.dispatch",
                 "layers.0.ffn.experts", "layers.0.ffn.combine", "head"):
        assert site in targets


def test_partition_places_every_parameter():
    st = run(state(), partition)
    assert st.stage_bounds == [(0, 2), (2, 4)]
    assert st.params["embed.weight"].stages == [0] and st.params["head.weight"].stages == [1]
    assert st.params["layers.3.ffn.experts.w1_EFD"].stages == [1]
    tied = run(state("parallelism.pp=2", "parallelism.dp=2", "parallelism.ep=2", "parallelism.pipeline.microbatches=2",
                     spec="small-moe"), partition)
    assert tied.params["embed.weight"].stages == [0, 1]  # the tied head's copy on the last stage
    assert "head.weight" not in tied.params


def test_sequence_parallelism_splits_the_sequence_between_tp_regions():
    """With sequence parallelism the residual stream holds s / tp positions: an all-gather enters each
    column-parallel region, a reduce-scatter leaves each row-parallel one, MoE layers route the rank's
    own positions (no split or gather of tokens), and the norms' gradients are summed over tp too."""
    st = run(state("parallelism.tp=2", "parallelism.dp=2", "parallelism.ep=2", "parallelism.sequence_parallel=true"),
             partition, expert_placement, tensor_parallel, moe_lowering, memory, data_parallel)
    lines = [(c.line, c.dim) for c in st.stage_comms(0)]
    assert ("gather_sequence", 1) in lines and ("reduce_scatter_sequence", 1) in lines
    assert not {"copy_to_tp", "split_tokens", "gather_tokens"} & {line for line, _ in lines}
    embed = next(c for c in st.stage_comms(0) if c.key[0] == st.position("embed"))
    assert embed.line == "reduce_scatter_sequence"
    assert [c.op for c in embed.forward] == ["reduce_scatter"] and [c.op for c in embed.backward] == ["all_gather"]
    assert embed.forward[0].shape == [128, 4, 128]  # (s, b, D) with the sequence first, as issued
    assert embed.backward[0].shape == [64, 4, 128]  # this rank's s / tp positions
    assert st.params["layers.0.attn_norm.weight"].grad_reduce == ["dp", "tp"]
    assert st.params["layers.0.attn.wq.weight"].grad_reduce == ["dp"]
    norms = next(b for b in st.buckets[0] if "layers.1.attn_norm.weight" in b.params)
    assert norms.axes == ["stage"]  # dp and tp at once
    plain = run(state("parallelism.tp=2", "parallelism.dp=2", "parallelism.ep=2"), partition, expert_placement,
                tensor_parallel)
    assert plain.params["layers.0.attn_norm.weight"].grad_reduce == ["dp"]


def test_plan_boundary_shape_is_what_a_rank_sends():
    spec = load_spec(SPECS / "tiny-moe.yaml", ["parallelism.tp=2", "parallelism.pp=2", "parallelism.dp=1",
                                               "parallelism.ep=1", "cluster.gpus_per_node=4",
                                               "parallelism.sequence_parallel=true"])
    plan = json.loads(compile_plan(spec)["plan.json"])
    b = spec.train.global_batch // spec.parallelism.pipeline.microbatches
    assert plan["schedule"]["boundary_shape"] == [b, spec.train.seq_len // 2, spec.model.d_model]

def test_tp_collectives_follow_the_shards():
    st = run(state("parallelism.tp=2", "parallelism.dp=2"), partition, expert_placement, tensor_parallel,
             moe_lowering)
    lines = [(c.line, c.forward[0].site if c.forward else c.backward[0].site) for c in st.stage_comms(0)]
    assert lines[:4] == [("all_reduce", "embed"), ("copy_to_tp", "layers.0.attn.wq"),
                         ("all_reduce", "layers.0.attn.wo"), ("split_tokens", "layers.0.ffn.router")]
    assert st.params["layers.0.attn_norm.weight"].grad_reduce == ["dp"]
    assert st.params["layers.0.ffn.router.weight_ED"].grad_reduce == ["dp", "tp"]  # a router sees 1/tp of the tokens


def test_gradient_buckets_cover_each_parameter_once():
    st = run(state("parallelism.ep=2"), partition, expert_placement, tensor_parallel, moe_lowering, memory,
             data_parallel)  # dp 4, edp 2
    for stage in (0, 1):
        names = [n for b in st.buckets[stage] for n in b.params]
        expected = [n for n, p in st.params.items() if stage in p.stages]
        assert sorted(names) == sorted(expected)
        assert {tuple(b.axes) for b in st.buckets[stage]} == {("dp",), ("edp",)}
    # an axis of one rank needs no reduction: with ep 4 of dp 4 every expert has one replica
    st = run(state(), partition, expert_placement, tensor_parallel, moe_lowering, memory, data_parallel)
    assert {tuple(b.axes) for b in st.buckets[0]} == {("dp",)}


def test_quantize_only_in_serve_plans():
    train = run(state(), partition, expert_placement, quantize)
    assert all(p.serve is None for p in train.params.values())
    serve = run(state(mode="serve"), partition, expert_placement, quantize)
    w2 = serve.params["layers.0.ffn.experts.w2_EDF"]
    assert w2.serve.packed == [64, 128, 32] and w2.serve.scales == [64, 128, 2]


def test_reduce_grad_follows_each_stages_last_backward():
    """torch.distributed.pipelining's REDUCE_GRAD, once per stage, right after the stage's last backward:
    with interleaved stages, stage 1's buckets complete while stage 0's backwards still run."""
    spec = load_spec(SPECS / "tiny-moe.yaml", ["parallelism.pp=2", "parallelism.dp=2", "parallelism.ep=2",
                                               "cluster.gpus_per_node=4", "parallelism.pipeline.microbatches=2",
                                               "parallelism.pipeline.schedule=interleaved_1f1b",
                                               "parallelism.pipeline.virtual_stages=2"])
    plan = json.loads(compile_plan(spec)["plan.json"])
    for pp_rank, actions in enumerate(plan["schedule"]["actions"]):
        stages = {r["stage"] for r in plan["roles"] if r["pp_rank"] == pp_rank}
        reductions = [a for a in actions if a.endswith("REDUCE_GRAD")]
        assert sorted(reductions) == [f"{s}REDUCE_GRAD" for s in sorted(stages)]
        for s in stages:
            i = actions.index(f"{s}REDUCE_GRAD")
            last_b = max(j for j, a in enumerate(actions) if a.startswith(f"{s}B"))
            sends = actions[last_b + 1] == f"{s}SEND_B{actions[last_b][len(f'{s}B'):]}"
            assert i == last_b + 1 + sends  # after the last backward, and after its send to the stage before
        assert actions.index(f"{max(stages)}REDUCE_GRAD") < actions.index(f"{min(stages)}REDUCE_GRAD")
    assert all(a["kind"] != "REDUCE_GRAD" for step in plan["schedule"]["step"] for a in step)
