"""The overlapped expert exchange and the zero-bubble schedules in the cost model: what hides is at most the
smaller of the communication and the compute beside it, overlap costs a step nothing but its own price (the
experts' second weight reads and gradients, the second half's latencies), the step splits exactly into
compute, exposed communication, fixed costs and bubble, and busy time is a share of the step."""

from __future__ import annotations

import itertools

import pytest

from lcc.compiler.cost import overlap as O
from lcc.compiler.cost.model import CostModel, step_seconds
from lcc.compiler.cost.report import cost_report
from lcc.compiler.cost.step import step_time
from lcc.compiler.layout import bubble_fraction
from lcc.spec import load_spec
from tests.conftest import SPECS

GRID = [0.0, 1e-4, 3e-4, 1e-3, 5e-3]


@pytest.mark.parametrize("share", [0.0, O.SM_SHARE, 0.5])
def test_hidden_is_at_most_the_exchange_and_the_experts(share):
    for d, c, e in itertools.product(GRID, GRID, GRID):
        h = O.hidden(d, c, e, share)
        assert -1e-15 <= h <= min(2 * d + 2 * c, 2 * e) + 1e-15, (d, c, e)
        assert h == pytest.approx(min(e, (1 - share) * d) + min(e, (1 - share) * c), abs=1e-15)


def test_the_halves_keep_their_dependencies_and_never_share_a_stream():
    spans = {s.name: s for s in O.halves(2.0, 3.0, 1.5)}
    assert spans["experts A"].start >= spans["dispatch A"].end
    assert spans["experts B"].start >= max(spans["dispatch B"].end, spans["experts A"].end)
    assert spans["combine A"].start >= max(spans["experts A"].end, spans["dispatch B"].end)
    assert spans["combine B"].start >= max(spans["experts B"].end, spans["combine A"].end)
    for stream in ("comm", "compute"):
        mine = sorted((s for s in spans.values() if s.stream == stream), key=lambda s: s.start)
        assert all(a.end <= b.start + 1e-12 for a, b in itertools.pairwise(mine))
    assert spans["dispatch A"].start == 0.0  # the first half's dispatch and the last half's combine are exposed
    assert spans["combine B"].end == max(s.end for s in spans.values())


LAYOUTS = [  # tiny-moe on 8 CPU ranks of one node: ep, pipelines, recomputation, tensor parallelism
    [],
    ["parallelism.pp=1", "parallelism.dp=8", "parallelism.ep=8", "parallelism.pipeline.microbatches=2"],
    ["parallelism.tp=2", "parallelism.dp=2", "parallelism.ep=4", "parallelism.sequence_parallel=true"],
    ["parallelism.activation_checkpointing=full", "parallelism.zero=3"],
    ["parallelism.pipeline.schedule=zbv", "parallelism.pipeline.virtual_stages=2"],
    ["parallelism.pipeline.schedule=zb_h1", "parallelism.pipeline.microbatches=8"],
]
FAST_MEMORY = ["cluster.device.memory_tbps=1000"]  # every layer compute-bound: the halves' reads cost nothing


def _pair(layout: list[str], extra: list[str] = ()) -> tuple[CostModel, CostModel]:
    plain = load_spec(SPECS / "tiny-moe.yaml", [*layout, *extra])
    halved = load_spec(SPECS / "tiny-moe.yaml", [*layout, *extra, "parallelism.expert_overlap=true"])
    return CostModel(plain), CostModel(halved)


@pytest.mark.parametrize("layout", LAYOUTS, ids=range(len(LAYOUTS)))
def test_overlap_hides_at_most_the_forward_exchange_and_the_experts(layout):
    _, cm = _pair(layout)
    for role in cm.roles:
        for i in role.layers:
            d, c, e = cm.layer_exchange(i)
            forwards = 2 if cm.par.activation_checkpointing == "full" else 1
            assert 0 <= cm.layer_hidden(i) <= forwards * min(d + d + c + c, 2 * e) + 1e-15
            assert cm.layer_hidden(i) <= cm.layer_work(i).seconds  # never more than the layer computes


@pytest.mark.parametrize("layout", LAYOUTS, ids=range(len(LAYOUTS)))
def test_overlap_never_makes_a_step_slower_when_it_costs_nothing_else(layout):
    """With compute-bound layers and no latency, the halves only hide: the step never grows. Otherwise it grows
    by at most the halves' own price: the expert weights read and the expert gradients written a second time,
    and the second half's collectives' latency."""
    plain, halved = _pair(layout, FAST_MEMORY)
    assert step_seconds(halved) <= step_seconds(plain) * (1 + 1e-12)
    plain, halved = _pair(layout, ["cluster.network.intra_node_latency_us=20"])
    price = 0.0
    for role in halved.roles:  # the rank's extra memory-side time and latency
        extra = sum(halved.layer_work(i).memory - plain.layer_work(i).memory + halved.layer_latency(i)
                    - plain.layer_latency(i) for i in role.layers)
        price = max(price, halved.m * extra)
    bubble = bubble_fraction(plain.par.pp, plain.par.pipeline.virtual_stages, plain.m, plain.par.pipeline.schedule)
    assert step_seconds(halved) <= step_seconds(plain) + price / (1 - bubble) + 1e-12


@pytest.mark.parametrize("layout", LAYOUTS, ids=range(len(LAYOUTS)))
@pytest.mark.parametrize("overlap", [False, True])
def test_the_step_splits_into_compute_communication_fixed_costs_and_bubble(layout, overlap):
    spec = load_spec(SPECS / "tiny-moe.yaml", [*layout, "cluster.network.intra_node_latency_us=5",
                                               f"parallelism.expert_overlap={str(overlap).lower()}"])
    cm = CostModel(spec)
    t = step_time(cm)
    assert t.seconds == step_seconds(cm)
    parts = t.compute[t.critical] + t.exposed + t.fixed + t.bubble_seconds
    assert parts == pytest.approx(t.seconds, rel=1e-12)
    report = cost_report(spec)["time"]
    assert 0 < report["busy_fraction"] <= report["busiest_busy_fraction"] <= 1
    assert report["exposed_communication_seconds"] >= 0 and report["bubble_seconds"] >= 0
    assert (report["hidden_communication_seconds"] > 0) == overlap


def test_zero_bubble_schedules_shrink_the_bubble_and_zbv_places_a_v():
    assert bubble_fraction(4, 1, 8, "zb_h1") == pytest.approx(3 / 27)  # (p - 1) / (3 m + p - 1)
    assert bubble_fraction(4, 2, 8, "zbv") == pytest.approx(3 / 51)  # p - 1 idle units of 6 m + p - 1
    assert bubble_fraction(4, 2, 4, "zbv") == pytest.approx(6 / 30)  # fewer than 2 p - 1 micro-batches
    assert bubble_fraction(4, 2, 8, "zbv") < bubble_fraction(4, 1, 8, "zb_h1") < bubble_fraction(4, 1, 8)
    spec = load_spec(SPECS / "tiny-moe.yaml", ["parallelism.pipeline.schedule=zbv",
                                               "parallelism.pipeline.virtual_stages=2"])
    cm = CostModel(spec)
    assert [r.stages for r in cm.roles] == [[0, 3], [1, 2]]
    assert [cm.boundaries(r) for r in cm.roles] == [2, 2]  # stages 1 and 2 hand over on pipeline rank 1
    interleaved = CostModel(load_spec(SPECS / "tiny-moe.yaml", ["parallelism.pipeline.schedule=interleaved_1f1b",
                                                                "parallelism.pipeline.virtual_stages=2"]))
    assert [interleaved.boundaries(r) for r in interleaved.roles] == [3, 3]
