"""Process groups from the plan's mesh: torch DeviceMeshes over the plan's rank order.

Dense parameters use the mesh (pp, dp, tp); experts the same ranks viewed as (pp, edp, ep) (the plan's
`f = dp * tp_size + tp; ep = f % ep_size; edp = f // ep_size`); a pipeline stage's ranks are (pp, dp x tp).
Every rank builds every mesh, in the same order; the rank table is checked against the mesh.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from lcc.plan.types import Plan

AXES = ("tp", "dp", "ep", "edp", "kv", "ep_inter", "ep_intra")


@dataclass
class Mesh:
    rank: int
    world: int
    coords: dict[str, int]  # pp, dp, tp, ep, edp, node
    sizes: dict[str, int]  # pp, dp, tp, ep, edp
    groups: types.SimpleNamespace  # tp, dp, ep, edp: this rank's groups (None in a world of one)
    stage_group: Any  # every rank of this rank's pipeline stage (dp x tp)
    rank_of: dict[tuple[int, int, int], int]  # (pp, dp, tp) -> rank
    device_meshes: dict[str, DeviceMesh] | None = None  # dense (pp, dp, tp), experts (pp, edp, ep), stages

    def axis_of(self) -> dict[Any, str]:
        """This rank's process groups -> the mesh axes they are (for transcripts). One group can be several
        axes (tp of a world of tp ranks is also the stage and the world): `tp|stage|world`."""
        named = {axis: getattr(self.groups, axis) for axis in AXES}
        named["stage"] = self.stage_group
        named["world"] = dist.group.WORLD if self.world > 1 else None
        out: dict[Any, list[str]] = {}
        for axis, g in named.items():
            if g is not None:
                out.setdefault(g, []).append(axis)
        return {g: "|".join(axes) for g, axes in out.items()}

    def peer(self, pp: int) -> int:
        """The rank with the same dp and tp coordinates on pipeline rank `pp`."""
        return self.rank_of[(pp, self.coords["dp"], self.coords["tp"])]


def build_mesh(plan: Plan, rank: int) -> Mesh:
    rows = [plan.ranks.coords(r) for r in range(len(plan.ranks.rows))]
    me = rows[rank]
    sizes = {axis: plan.mesh.size(axis) for axis in ("pp", "dp", "tp", "ep", "edp")}
    distributed = dist.is_available() and dist.is_initialized() and len(rows) > 1
    mine: dict[str, Any] = {axis: None for axis in AXES}
    stage_group = None
    meshes = None
    if distributed:
        kind = "cuda" if plan.device == "cuda" else "cpu"  # NCCL groups on CUDA plans (lcc.runtime.device)
        ranks = torch.arange(len(rows))
        shapes = {"dense": ("pp", "dp", "tp"), "experts": ("pp", "edp", "ep")}
        for name, axes in shapes.items():
            expected = ranks.view(*(sizes[a] for a in axes))
            for r in rows:
                if int(expected[tuple(r[a] for a in axes)]) != r["rank"]:
                    raise ValueError(f"plan rank table: rank {r['rank']} is not at {dict((a, r[a]) for a in axes)} "
                                     f"of the {name} mesh {axes}")
        meshes = {name: DeviceMesh(kind, ranks.view(*(sizes[a] for a in axes)), mesh_dim_names=axes)
                  for name, axes in shapes.items()}
        meshes["stages"] = DeviceMesh(kind, ranks.view(sizes["pp"], -1), mesh_dim_names=("pp", "stage"))
        mine = {"dp": meshes["dense"].get_group("dp"), "tp": meshes["dense"].get_group("tp"),
                "edp": meshes["experts"].get_group("edp"), "ep": meshes["experts"].get_group("ep"), "kv": None,
                "ep_inter": None, "ep_intra": None}
        if plan.mesh.kv > 1:  # consecutive tp ranks holding the same kv heads
            kv = plan.mesh.kv
            meshes["kv"] = DeviceMesh(kind, ranks.view(sizes["pp"], sizes["dp"], sizes["tp"] // kv, kv),
                                      mesh_dim_names=("pp", "dp", "kv_heads", "kv"))
            mine["kv"] = meshes["kv"].get_group("kv")
        if plan.mesh.ep_inter > 1:  # the hierarchical expert exchange: an EP group as nodes x ranks per node
            meshes["expert_nodes"] = DeviceMesh(
                kind, ranks.view(sizes["pp"], sizes["edp"], plan.mesh.ep_inter, plan.mesh.ep_intra),
                mesh_dim_names=("pp", "edp", "ep_inter", "ep_intra"))
            mine["ep_inter"] = meshes["expert_nodes"].get_group("ep_inter")
            mine["ep_intra"] = meshes["expert_nodes"].get_group("ep_intra")
        stage_group = meshes["stages"].get_group("stage")
    return Mesh(rank, len(rows), {k: me[k] for k in ("pp", "dp", "tp", "ep", "edp", "node")}, sizes,
                types.SimpleNamespace(**mine), stage_group,
                {(r["pp"], r["dp"], r["tp"]): r["rank"] for r in rows}, meshes)
