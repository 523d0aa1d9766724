"""Each pass on its own, through the state it fills."""

from __future__ import annotations

from lcc.compiler.passes import data_parallel, expert_placement, moe_lowering, partition, quantize, tensor_parallel
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


def test_sequence_parallel_collectives():
    st = run(state("parallelism.tp=2", "parallelism.dp=2", "parallelism.sequence_parallel=true"),
             partition, expert_placement, tensor_parallel, moe_lowering)
    ops = {(c["op"], c["axis"]) for c in st.collectives[0]}
    assert ("reduce_scatter", "tp") in ops and ("all_gather", "tp") in ops
    assert ("split_tokens", "tp") not in ops  # tokens are already split along the sequence
    assert st.params["layers.0.attn_norm.weight"].grad_reduce == ["dp", "tp"]


def test_gradient_buckets_cover_each_parameter_once():
    st = run(state(), partition, expert_placement, tensor_parallel, moe_lowering, data_parallel)
    for stage in (0, 1):
        names = [n for b in st.plan["grad_buckets"][str(stage)] for n in b["params"]]
        expected = [n for n, p in st.params.items() if stage in p.stages]
        assert sorted(names) == sorted(expected)
        assert {tuple(b["axes"]) for b in st.plan["grad_buckets"][str(stage)]} == {("dp",), ("edp",)}


def test_quantize_only_in_serve_plans():
    train = run(state(), partition, expert_placement, quantize)
    assert all(p.serve is None for p in train.params.values())
    serve = run(state(mode="serve"), partition, expert_placement, quantize)
    w2 = serve.params["layers.0.ffn.experts.w2_EDF"]
    assert w2.serve["packed"] == [64, 128, 32] and w2.serve["scales"] == [64, 128, 2]
