from __future__ import annotations

import pytest

from lcc.compiler import layout as L
from lcc.spec.models import Parallelism


def par(**kw) -> Parallelism:
    return Parallelism(**kw)


def test_rank_order_tp_fastest():
    p = par(pp=2, dp=2, tp=2, ep=4)
    c = L.coords(p, 4, 7)
    assert (c.pp, c.dp, c.tp, c.node) == (1, 1, 1, 1)
    assert L.rank_of(p, 1, 0, 1) == 5
    for r in range(p.world_size):
        c = L.coords(p, 4, r)
        assert L.rank_of(p, c.pp, c.dp, c.tp) == r
        f = c.dp * p.tp + c.tp
        assert (c.ep, c.edp) == (f % p.ep, f // p.ep)


def test_groups_cover_each_rank_once_per_axis():
    p = par(pp=2, dp=4, tp=2, ep=4)
    for axis in L.AXES:
        members = sorted(r for g in L.groups(p, axis) for r in g)
        assert members == list(range(p.world_size)), axis
    assert L.groups(p, "tp")[:2] == [(0, 1), (2, 3)]
    assert L.groups(p, "dp")[0] == (0, 2, 4, 6)
    assert L.groups(p, "ep")[:2] == [(0, 1, 2, 3), (4, 5, 6, 7)]  # consecutive ranks
    assert L.groups(p, "edp")[0] == (0, 4)
    assert L.groups(p, "pp")[0] == (0, 8)


def test_expert_placement_by_group():
    # 16 experts, 4 groups, ep 2: groups 0,1 on EP rank 0
    assert [L.expert_home(16, 2, e) for e in (0, 7, 8, 15)] == [(0, 0), (0, 7), (1, 0), (1, 7)]
    assert list(L.group_ep_ranks(16, 4, 2, 1)) == [0]
    # ep 8 > 4 groups: each group spread over 2 EP ranks
    assert list(L.group_ep_ranks(16, 4, 8, 1)) == [2, 3]


@pytest.mark.parametrize(("costs", "stages", "expected"), [
    ([1, 1, 1, 1], 2, [(0, 2), (2, 4)]),
    ([1, 1, 1, 5], 2, [(0, 3), (3, 4)]),
    ([1] * 8, 4, [(0, 2), (2, 4), (4, 6), (6, 8)]),
    ([3, 1, 1, 1, 1, 1], 2, [(0, 2), (2, 6)]),
    ([1, 2, 3], 3, [(0, 1), (1, 2), (2, 3)]),
])
def test_partition_minimises_the_slowest_stage(costs, stages, expected):
    assert L.partition(costs, stages) == expected


def test_partition_refuses_more_stages_than_layers():
    with pytest.raises(ValueError):
        L.partition([1, 1], 3)


def test_inflight_and_bubble():
    assert [L.inflight_chunks("1f1b", 4, 1, 8, r) for r in range(4)] == [4, 3, 2, 1]
    assert L.inflight_chunks("gpipe", 4, 1, 8, 3) == 8
    assert L.inflight_chunks("interleaved_1f1b", 2, 2, 4, 0) == 2 * 1 + 2 + 1
    assert L.bubble_fraction(4, 1, 8) == pytest.approx(3 / 11)
    assert L.bubble_fraction(4, 2, 8) == pytest.approx(3 / 19)
