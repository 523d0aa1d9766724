"""The expert exchange's price (lcc/compiler/cost/exchange.py, docs/cost-model.md "The expert exchange"):
the expected distinct nodes per token against an exact enumeration, the bytes per link against a simulation
of the two exchanges written here, and the report's flat against hierarchical."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from lcc.compiler.cost.exchange import distinct_nodes, hierarchical_bytes, token_spread
from lcc.compiler.cost.model import CostModel
from lcc.compiler.cost.report import cost_report
from lcc.spec import load_spec
from tests.conftest import SPECS

TINY = SPECS / "tiny-moe.yaml"
# tiny-moe (8 groups of 8 experts) on 8 ranks in 4 nodes of 2, every rank one EP rank: an EP group spans 4 nodes
NODES = ["cluster.nodes=4", "cluster.gpus_per_node=2", "parallelism.tp=1", "parallelism.pp=1", "parallelism.dp=8",
         "parallelism.ep=8", "parallelism.pipeline.microbatches=1", "train.global_batch=16"]
LIMITED = ["routing.groups.sets=4", "routing.groups.max_sets=1"]  # a token's experts on one node


def spec(*sets: str, exchange: str = "flat"):
    return load_spec(TINY, [*NODES, *sets, f"parallelism.expert_exchange={exchange}"])


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_distinct_nodes_is_the_mean_over_every_placement_of_the_slots(n, k):
    """k slots on n nodes, each of the n^k placements equally likely: the mean number of nodes used."""
    placements = list(itertools.product(range(n), repeat=k))
    mean = sum(len(set(p)) for p in placements) / len(placements)
    assert distinct_nodes(k, n) == pytest.approx(mean, rel=1e-12)


def _routed_nodes(rng: random.Random, groups: int, nodes: int, sets: int, kept: int, top: int, k: int) -> int:
    """Distinct nodes of one token's k slots when routing keeps `kept` random sets, `top` random groups inside
    them and puts each slot in one of those groups (groups lie on nodes in order)."""
    per_set, per_node = groups // sets, groups // nodes
    candidates = [g for s in rng.sample(range(sets), kept) for g in range(s * per_set, (s + 1) * per_set)]
    chosen = rng.sample(candidates, top)
    return len({rng.choice(chosen) // per_node for _ in range(k)})


@pytest.mark.parametrize("sets,max_sets,k", [(1, None, 2), (1, None, 3), (16, 2, 2), (16, 2, 3), (16, 1, 3)])
def test_uniform_slots_over_reachable_nodes_bound_group_routing_from_above(sets, max_sets, k):
    """LongCat-2.0's placement (128 groups on 16 nodes, top 4): when a token's slots fall in its kept groups
    rather than uniformly on its reachable nodes, two groups may share a node and the token reaches fewer
    nodes; the formula stays above by at most 15% (the model is conservative)."""
    overrides = ["parallelism.tp=1", "parallelism.pp=8", "parallelism.dp=256", "parallelism.ep=128",
                 f"routing.groups.sets={sets}", f"routing.k.expected={k}", "routing.k.min=1", "routing.k.max=4",
                 "parallelism.pipeline.microbatches=16", "parallelism.zero=0", "parallelism.sequence_parallel=false",
                 "parallelism.activation_checkpointing=none"]
    if max_sets is not None:
        overrides.append(f"routing.groups.max_sets={max_sets}")
    spread = token_spread(load_spec(SPECS / "longcat-2.0.yaml", overrides))
    rng = random.Random(7)
    trials = 4000
    simulated = sum(_routed_nodes(rng, 128, 16, sets, max_sets or sets, 4, k) for _ in range(trials)) / trials
    assert simulated * 0.97 <= spread.distinct <= simulated * 1.15, (spread, simulated)


def _simulate(nodes: int, per_node: int, reachable: int, k: int, tokens: int, seed: int) -> dict[str, float]:
    """Per token and per pass, the rows each exchange sends: a token on a random rank; its slots on `reachable`
    random nodes (uniformly, independently) and a random rank there. Flat sends each slot to its rank; the
    hierarchical exchange sends a row to each other node it needs, and the peer at the token rank's place on
    the destination node forwards each slot whose expert is on another rank of that node."""
    rng = random.Random(seed)
    flat_inter = flat_intra = hier_inter = hier_intra = 0
    for _ in range(tokens):
        own, place = rng.randrange(nodes), rng.randrange(per_node)
        allowed = rng.sample(range(nodes), reachable)
        slots = [(rng.choice(allowed), rng.randrange(per_node)) for _ in range(k)]
        flat_inter += sum(node != own for node, _ in slots)
        flat_intra += sum(node == own and rank != place for node, rank in slots)
        hier_inter += len({node for node, _ in slots} - {own})
        hier_intra += sum(rank != place for _, rank in slots)
    return {"flat_inter": flat_inter / tokens, "flat_intra": flat_intra / tokens,
            "hier_inter": hier_inter / tokens, "hier_intra": hier_intra / tokens}


@pytest.mark.parametrize("sets,k", [([], 2), (LIMITED, 2), (["routing.groups.sets=4", "routing.groups.max_sets=2",
                                                              "routing.groups.top=4"], 3)])
def test_bytes_per_link_are_a_simulated_exchanges(sets, k):
    """The model's rows per token and pass on each link, flat and hierarchical, against a simulation of the two
    protocols under uniform routing; the per-slot gate and index are priced apart (a row here is 10^9 bytes,
    so they vanish)."""
    kk = [f"routing.k.expected={k}"]
    flat, hier = spec(*sets, *kk), spec(*sets, *kk, exchange="hierarchical")
    s = token_spread(hier)
    got = hierarchical_bytes(hier, 1.0, 1e9, 4)
    sim = _simulate(s.nodes, s.ranks_per_node, s.reachable, k, 20_000, seed=k)
    assert got.inter / 4e9 == pytest.approx(sim["hier_inter"], rel=0.03)
    assert got.intra / 4e9 == pytest.approx(sim["hier_intra"], rel=0.03)
    cm = CostModel(flat)
    share = cm.ep_links.inter_share
    per_token = cost_report(flat)["comm"]["bytes_per_step"]["by_kind"]["expert_alltoall"] / (
        16 * 128 * 4 * flat.model.d_model * 4 * flat.model.n_layers)  # tokens x passes x row x MoE layers
    assert per_token * share == pytest.approx(sim["flat_inter"], rel=0.03)
    assert per_token * (1 - share) == pytest.approx(sim["flat_intra"], rel=0.06)


def test_hierarchical_sends_fewer_inter_node_bytes_than_flat_with_a_node_limit():
    """k = 2 on one node of 4: a token crosses once where flat sends both slots (dedup ratio 2)."""
    flat = cost_report(spec(*LIMITED))["comm"]["expert_exchange"]
    hier = cost_report(spec(*LIMITED, exchange="hierarchical"))["comm"]["expert_exchange"]
    assert hier["exchange"] == "hierarchical" and flat["exchange"] == "flat"
    assert hier["token_nodes"] == flat["token_nodes"] == 1 and hier["dedup_ratio"] == pytest.approx(2.0)
    ratio = hier["inter_node_bytes_per_step"] / flat["inter_node_bytes_per_step"]
    assert 0.5 < ratio < 0.51  # half the rows, plus a gate and an index per slot
    assert hier["inter_node_seconds"] == pytest.approx(flat["inter_node_seconds"] * ratio)
    assert hier["intra_node_bytes_per_step"] > flat["intra_node_bytes_per_step"]  # every slot is forwarded


def test_with_one_slot_per_token_both_send_the_same_rows_between_nodes():
    one = ["routing.k.min=1", "routing.k.max=1", "routing.k.expected=1"]
    flat = cost_report(spec(*one))["comm"]["expert_exchange"]
    hier = cost_report(spec(*one, exchange="hierarchical"))["comm"]["expert_exchange"]
    assert hier["dedup_ratio"] == pytest.approx(1.0)
    assert hier["inter_node_bytes_per_step"] == pytest.approx(flat["inter_node_bytes_per_step"], rel=0.02)
    assert hier["inter_node_bytes_per_step"] >= flat["inter_node_bytes_per_step"]  # the gate and index ride along


def test_flat_exchange_ignores_the_node_limit():
    """Each slot still lands on any EP rank with equal chance, so flat bytes do not change with max_sets."""
    free, limited = cost_report(spec()), cost_report(spec(*LIMITED))
    assert free["comm"]["bytes_per_step"] == limited["comm"]["bytes_per_step"]
    assert free["time"]["step_seconds_estimate"] == limited["time"]["step_seconds_estimate"]
    assert limited["comm"]["expert_exchange"]["token_nodes"] == 1 < free["comm"]["expert_exchange"]["token_nodes"]


@pytest.mark.parametrize("policy", ["none", "selective", "full"])
def test_hierarchical_fixed_costs_count_the_plans_collectives(policy):
    """At 1 us a collective, the estimated fixed seconds of a hierarchical layout are the collectives its
    compiled plan lists, node plans and both levels included."""
    from lcc.compiler.plan import compile_plan
    from tests.cost.test_fixed_costs import planned_collectives

    hier = load_spec(TINY, ["cluster.network.intra_node_latency_us=1", "cluster.network.inter_node_latency_us=1",
                            "cluster.nodes=2", "cluster.gpus_per_node=2", "parallelism.tp=1", "parallelism.pp=1",
                            "parallelism.dp=4", "parallelism.ep=4", "parallelism.pipeline.microbatches=1",
                            "parallelism.expert_exchange=hierarchical",
                            f"parallelism.activation_checkpointing={policy}"])
    plan = json.loads(compile_plan(hier, "train")["plan.json"])
    cm = CostModel(hier)
    assert {r.pp_rank: round(sum(cm.role_latency(r)) * 1e6, 6) for r in cm.roles} == planned_collectives(plan)


def test_report_states_the_exchange_per_layout():
    report = cost_report(spec(exchange="hierarchical"))
    ex = report["comm"]["expert_exchange"]
    assert ex["ep_nodes"] == 4 and ex["ranks_per_node"] == 2 and ex["reachable_nodes"] == 2
    assert ex["nodes_per_token"] == pytest.approx(1.5)  # k 2 on 2 nodes
    assert report["comm"]["expert_alltoall_inter_node_share"] == pytest.approx(
        ex["inter_node_bytes_per_step"] / report["comm"]["bytes_per_step"]["by_kind"]["expert_alltoall"])
    assert cost_report(load_spec(TINY))["comm"]["expert_exchange"]["ep_nodes"] == 1
