"""The cost model's fixed costs (a latency per collective and pipeline message) count what compiled plans
issue, and its memory side moves every local gradient whole."""

from __future__ import annotations

import json

import pytest

from lcc.compiler.cost.model import CostModel
from lcc.compiler.cost.report import cost_report
from lcc.compiler.plan import compile_plan
from lcc.spec import load_spec
from tests.conftest import SPECS

ONE_US = ["cluster.network.intra_node_latency_us=1", "cluster.network.inter_node_latency_us=1",
          "cluster.nodes=1", "cluster.gpus_per_node=4", "parallelism.pp=1", "parallelism.pipeline.microbatches=1"]

LAYOUTS = [  # world 4: tp, sequence parallelism, ep, ZeRO, recomputation, pipelines (interleaved too)
    "tp=2 dp=2 ep=2",
    "tp=2 dp=2 ep=4 sequence_parallel=true",
    "tp=2 dp=2 ep=2 sequence_parallel=true activation_checkpointing=full",
    "tp=4 dp=1 ep=2 activation_checkpointing=selective pipeline.microbatches=2",
    "dp=4 ep=2 zero=1",
    "dp=4 ep=4 zero=3 activation_checkpointing=full",
    "dp=4 ep=2 zero=2 pipeline.microbatches=2",
    "tp=2 dp=2 ep=1 zero=3",
    "pp=2 dp=2 ep=2 pipeline.microbatches=2",
    "pp=2 tp=2 dp=1 ep=2 pipeline.schedule=interleaved_1f1b pipeline.virtual_stages=2 pipeline.microbatches=4",
    "pp=4 dp=1 ep=1 pipeline.schedule=gpipe pipeline.microbatches=2",
    "dp=4 ep=4 expert_overlap=true",  # each half's counts, dispatch and combine; both transposes backward
    "tp=2 dp=2 ep=2 expert_overlap=true activation_checkpointing=full",
    "pp=2 dp=2 ep=2 pipeline.schedule=zbv pipeline.virtual_stages=2 pipeline.microbatches=2",
]


def planned_collectives(plan: dict) -> dict[int, int]:
    """Per pipeline rank, the collectives and messages one of its ranks issues in a step, read off the plan:
    its programs' collectives every micro-batch, its pipeline sends and receives, its gradient buckets
    (every micro-batch when reduced per micro-batch) and the step's own reductions."""
    m = plan["schedule"]["microbatches"]
    per_microbatch = plan["memory"]["grad_reduce"] == "microbatch"
    step = sum(len(a["collectives"]) for a in plan["schedule"]["step"][0])
    out = {}
    for pp_rank, actions in enumerate(plan["schedule"]["actions"]):
        roles = [r for r in plan["roles"] if r["pp_rank"] == pp_rank]
        programs = sum(len(r["forward"]) + len(r["backward"]) for r in roles)
        messages = sum("SEND" in a or "RECV" in a for a in actions)
        buckets = sum(len(r["grad_buckets"]) for r in roles)
        out[pp_rank] = m * programs + messages + buckets * (m if per_microbatch else 1) + step
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fixed_costs_count_the_plans_collectives(layout):
    """At 1 us a collective, the busiest rank's fixed seconds are its collective count; each pipeline rank's
    count is within 15% of the plan's (ZeRO-3's gathers of tied and embedding parameters, and buckets
    split by parameter boundaries, are approximated)."""
    spec = load_spec(SPECS / "tiny-moe.yaml", ONE_US + [f"parallelism.{kv}" for kv in layout.split()])
    plan = json.loads(compile_plan(spec, "train")["plan.json"])
    cm = CostModel(spec)
    planned = planned_collectives(plan)
    estimated = {r.pp_rank: sum(cm.role_latency(r)) * 1e6 for r in cm.roles}
    assert estimated.keys() == planned.keys()
    for rank, count in planned.items():
        assert estimated[rank] == pytest.approx(count, rel=0.15), (rank, estimated, planned)
    assert cost_report(spec)["time"]["fixed_seconds"] == pytest.approx(max(estimated.values()) * 1e-6)


def test_latency_adds_to_the_step_and_defaults_to_nothing():
    base = load_spec(SPECS / "tiny-moe.yaml")
    plain = cost_report(base)["time"]
    assert plain["fixed_seconds"] == 0.0
    slow = cost_report(load_spec(SPECS / "tiny-moe.yaml", ["cluster.network.intra_node_latency_us=1000",
                                                          "cluster.network.inter_node_latency_us=1000"]))["time"]
    assert slow["fixed_seconds"] > 0.01  # tiny-moe's ranks issue tens of collectives a step
    assert slow["step_seconds_estimate"] > plain["step_seconds_estimate"] + slow["fixed_seconds"] * 0.5


def test_memory_side_moves_weights_and_whole_gradients():
    """A layer's memory time (docs/cost-model.md, "Compute time is a roofline"): its weight reads, forward
    and backward, plus three passes over its whole local gradients, over memory_tbps. By hand for a tiny-moe
    layer at dp 2, ep 2, float32:
    dense q, o 128 x 128 each, k, v 128 x 64 each, 2 norms of 128, router (8 centroids + 64 rows) x 128:
    32768 + 16384 + 256 + 9216 = 58624; experts 64 / 2 = 32 local, each 3 x 128 x 64: 786432. Each rank's
    micro-batch routes 4 x 128 tokens x k.expected 2 = 1024 slots, so all 32 local experts are read."""
    spec = load_spec(SPECS / "tiny-moe.yaml", ["parallelism.tp=1", "parallelism.pp=1", "parallelism.dp=2",
                                               "parallelism.ep=2", "parallelism.zero=0",
                                               "cluster.gpus_per_node=2", "cluster.nodes=1"])
    weights = 58624 + 786432
    reads = 2 * weights * 4  # 6_760_448 bytes
    grads = 3 * weights * 4  # 10_140_672 bytes: every local expert's gradient, reached by tokens or not
    assert CostModel(spec).layer_work(0).memory == pytest.approx((reads + grads) / 0.02e12)  # 8.45056e-4 s
