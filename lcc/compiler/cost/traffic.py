"""Communication: bytes each collective sends per rank, and how a group's traffic splits over links.

Ring algorithms for all-reduce, reduce-scatter and all-gather (each rank sends 2(n-1)/n, (n-1)/n and
(n-1)/n of the full buffer); an all-to-all sends (n-1)/n of the local buffer, spread evenly over peers
(uniform routing). A ring that leaves its node runs at the inter-node rate; an all-to-all sends its
intra- and inter-node parts in parallel over the two kinds of link.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from lcc.compiler.layout import groups
from lcc.spec.models import Spec

BUCKET_ELEMENTS = 25_000_000  # per-rank gradient elements per reduction bucket (the data_parallel pass)


def all_reduce(size: float, n: int) -> float:
    return 2 * (n - 1) / n * size


def all_gather(size: float, n: int) -> float:
    """Also the bytes of a reduce-scatter of a `size`-byte buffer."""
    return (n - 1) / n * size


def all_to_all(size: float, n: int) -> float:
    return (n - 1) / n * size


@dataclass(frozen=True)
class Links:
    """How the traffic of one kind of process group splits between intra- and inter-node links."""

    inter_share: float  # share of the bytes that cross nodes
    crosses_nodes: bool  # some group of this kind spans more than one node

    def seconds(self, bytes_sent: float, intra_bps: float, inter_bps: float, ring: bool) -> float:
        if ring:
            return bytes_sent / (inter_bps if self.crosses_nodes else intra_bps)
        inter = bytes_sent * self.inter_share
        return max((bytes_sent - inter) / intra_bps, inter / inter_bps)


def ring_links(members: tuple[int, ...], per_node: int) -> tuple[int, int]:
    """(ring edges crossing nodes, edges) for a ring over `members` in group order."""
    n = len(members)
    if n < 2:
        return 0, 0
    crossing = sum(members[i] // per_node != members[(i + 1) % n] // per_node for i in range(n))
    return crossing, n


def chain_links(members: tuple[int, ...], per_node: int) -> tuple[int, int]:
    """(hops crossing nodes, hops) along a pipeline: stage i sends to stage i + 1 only."""
    hops = len(members) - 1
    return sum(members[i] // per_node != members[i + 1] // per_node for i in range(hops)), hops


def pair_links(members: tuple[int, ...], per_node: int) -> tuple[int, int]:
    """(ordered peer pairs on different nodes, all ordered pairs) for an all-to-all over `members`."""
    n = len(members)
    counts = Counter(m // per_node for m in members).values()
    return sum(c * (n - c) for c in counts), n * (n - 1)


def links(spec: Spec, axis: str) -> Links:
    """Link split of every group along a mesh axis, pooled over all groups of that axis."""
    per_node = spec.cluster.gpus_per_node
    count = {"ep": pair_links, "pp": chain_links}.get(axis, ring_links)
    crossing = total = 0
    spans = False
    for members in groups(spec.parallelism, axis):
        c, t = count(members, per_node)
        crossing, total = crossing + c, total + t
        spans = spans or len({m // per_node for m in members}) > 1
    return Links(crossing / total if total else 0.0, spans)
