"""Process groups from the plan's rank table (every rank creates every group, in the same order)."""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

AXES = ("tp", "dp", "ep", "edp")


@dataclass
class Mesh:
    rank: int
    world: int
    coords: dict[str, int]  # pp, dp, tp, ep, edp, node
    sizes: dict[str, int]  # pp, dp, tp, ep, edp
    groups: types.SimpleNamespace  # tp, dp, ep, edp: this rank's groups (None in a world of one)
    stage_group: Any  # every rank of this rank's pipeline stage (dp x tp)
    rank_of: dict[tuple[int, int, int], int]  # (pp, dp, tp) -> rank

    def peer(self, pp: int) -> int:
        """The rank with the same dp and tp coordinates on pipeline rank `pp`."""
        return self.rank_of[(pp, self.coords["dp"], self.coords["tp"])]


def build_mesh(plan: dict[str, Any], rank: int) -> Mesh:
    columns = plan["ranks"]["columns"]
    rows = [dict(zip(columns, row, strict=True)) for row in plan["ranks"]["rows"]]
    me = rows[rank]
    mesh = plan["mesh"]
    sizes = dict(zip(mesh["axes"], mesh["sizes"], strict=True)) | {"ep": mesh["ep"], "edp": mesh["edp"]}
    distributed = dist.is_available() and dist.is_initialized() and len(rows) > 1
    mine: dict[str, Any] = {axis: None for axis in AXES}
    stage_group = None
    if distributed:
        for axis in AXES:
            others = [a for a in ("pp", *AXES) if a != axis and not (axis in ("ep", "edp") and a in ("dp", "tp"))
                      and not (axis in ("dp", "tp") and a in ("ep", "edp"))]
            for key in sorted({tuple(r[a] for a in others) for r in rows}):
                members = [r["rank"] for r in rows if tuple(r[a] for a in others) == key]
                group = dist.new_group(members)
                if rank in members:
                    mine[axis] = group
        for pp in range(sizes["pp"]):
            members = [r["rank"] for r in rows if r["pp"] == pp]
            group = dist.new_group(members)
            if me["pp"] == pp:
                stage_group = group
    return Mesh(rank, len(rows), {k: me[k] for k in ("pp", "dp", "tp", "ep", "edp", "node")}, sizes,
                types.SimpleNamespace(**mine), stage_group,
                {(r["pp"], r["dp"], r["tp"]): r["rank"] for r in rows})
