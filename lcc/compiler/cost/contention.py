"""Ranks that share a host's cores compute faster while some of them wait: CPU ranks in a pipeline's fill and
drain, where only some stages have work (docs/cost-model.md, "Ranks sharing a host").

The schedule simulator (lcc.compiler.schedule) gives which pipeline ranks compute in each interval of a step,
in its cost units. A pipeline rank is `dp x tp` ranks, consecutive in the mesh (`rank = (pp * dp_size + dp)
* tp_size + tp`), and a node holds `gpus_per_node` consecutive ranks; in each interval the busiest node's
count of computing ranks sets the rate (`Rates.speed`, from the calibration's concurrency table). The
stretch is the step's compute time at those rates over its time at the all-busy rate the other tables
were measured at:

    stretch = sum(length / speed(busy ranks)) / sum(length)   over the intervals

It is 1 where the table is absent (a datasheet cluster, or a calibration without it) and wherever every rank
of a node computes at once, as in a layout without pipeline parallelism on the ranks calibrated.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from lcc.compiler.schedule import COST, add_p2p, generate, simulate

if TYPE_CHECKING:
    from lcc.compiler.cost.model import CostModel


@lru_cache(maxsize=512)
def busy_intervals(schedule: str, pp: int, virtual: int, microbatches: int) -> tuple[tuple[float, frozenset], ...]:
    """(length, pipeline ranks computing) of each interval of one simulated step, in the simulator's units."""
    events: list = []
    lowered = add_p2p(generate(schedule, pp, virtual, microbatches), pp * virtual, schedule)
    simulate(lowered, pp * virtual, microbatches, events, placement=schedule)
    spans = [(start, end, rank) for rank, action, start, end in events if action.kind in COST and end > start]
    edges = sorted({t for start, end, _ in spans for t in (start, end)})
    out = []
    for t0, t1 in zip(edges, edges[1:], strict=False):
        busy = frozenset(rank for start, end, rank in spans if start <= t0 and end >= t1)
        out.append((float(t1 - t0), busy))
    return tuple(out)


def compute_stretch(cm: CostModel) -> float:
    """How much longer a pipeline rank's compute takes in the step than at the all-busy calibrated rate."""
    rates, par = cm.rates, cm.par
    if rates is None or not rates.c.concurrency:
        return 1.0
    per_node = cm.spec.cluster.gpus_per_node
    ranks = par.dp * par.tp  # ranks of one pipeline rank, consecutive
    pipe = par.pipeline
    total = slowed = 0.0
    for length, busy in busy_intervals(pipe.schedule, par.pp, pipe.virtual_stages, pipe.microbatches):
        nodes: dict[int, int] = {}
        for p in busy:
            first, end = p * ranks, (p + 1) * ranks
            for node in range(first // per_node, (end - 1) // per_node + 1):
                here = min(end, (node + 1) * per_node) - max(first, node * per_node)
                nodes[node] = nodes.get(node, 0) + here
        total += length
        slowed += length / rates.speed(max(nodes.values()))
    return slowed / total if total else 1.0
