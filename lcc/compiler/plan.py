"""Spec -> plan: run the passes, check what cannot work, and lay out the plan files deterministically.

`compile_plan(spec, mode)` returns {relative path: text}. Same spec, same bytes: sorted keys, no
timestamps, no absolute paths, nothing from the compiling machine (the kernel backend follows from
`cluster.device.kind`).
"""

from __future__ import annotations

import json
from typing import Any

from lcc.compiler.codegen import render_programs
from lcc.compiler.cost import cost_report
from lcc.compiler.layout import coords
from lcc.compiler.passes import (
    data_parallel,
    expert_placement,
    memory,
    moe_lowering,
    partition,
    quantize,
    tensor_parallel,
)
from lcc.compiler.schedule import COST, add_p2p, generate, simulate, to_csv
from lcc.compiler.state import CompileState
from lcc.compiler.trace import trace
from lcc.spec import Problem, SpecError, locate, resolved, spec_hash
from lcc.spec.models import Spec

PLAN_VERSION = 1
PASSES = [partition, expert_placement, tensor_parallel, moe_lowering, memory, data_parallel, quantize]
BACKWARD = {"all_reduce": "all_reduce of the block input's gradient (column-parallel input)",
            "reduce_scatter": "all_gather", "all_gather": "reduce_scatter", "all_to_all": "all_to_all",
            "split_tokens": "all_gather of the token gradients"}


def check_fits(spec: Spec, report: dict[str, Any]) -> None:
    memory = report["memory"]
    if memory["fits"]:
        return
    worst = memory["worst_rank"]
    path = ("cluster", "device", "memory_gib")
    need = worst["total_bytes"] / 2**30
    raise SpecError([Problem(locate(spec, path), path,
                             f"rank {worst['rank']} ({worst['role']}) needs {need:.2f} GiB by the cost model, more "
                             f"than the device's {spec.cluster.device.memory_gib} GiB",
                             "raise zero, use activation checkpointing, add pipeline stages or expert parallelism "
                             "(lcc report shows the breakdown)",
                             ("parallelism.zero", "parallelism.activation_checkpointing"))])


def compile_plan(spec: Spec, mode: str = "train") -> dict[str, str]:
    report = cost_report(spec)
    if mode == "train":
        check_fits(spec, report)
    state = CompileState(spec, mode, trace(spec))
    for p in PASSES:
        p.run(state)
        state.applied.append({"name": p.NAME, "description": p.DESCRIPTION})
    _order_collectives(state)
    par = spec.parallelism
    n_stages = par.n_stages
    compute = generate(par.pipeline.schedule, par.pp, par.pipeline.virtual_stages, par.pipeline.microbatches)
    lowered = add_p2p(compute, n_stages)
    sim = simulate(lowered, n_stages, par.pipeline.microbatches)
    plan = {
        "version": PLAN_VERSION,
        "spec_name": spec.name,
        "spec_hash": spec_hash(spec),
        "mode": mode,
        "world_size": par.world_size,
        "mesh": {"axes": ["pp", "dp", "tp"], "sizes": [par.pp, par.dp, par.tp], "ep": par.ep, "edp": par.edp,
                 "rank_order": "rank = (pp * dp_size + dp) * tp_size + tp; f = dp * tp_size + tp; "
                               "ep = f % ep_size; edp = f // ep_size; node = rank // gpus_per_node",
                 "gpus_per_node": spec.cluster.gpus_per_node},
        "backend": "triton" if spec.cluster.device.kind == "cuda" else "torch",
        "dtype": spec.train.dtype if mode == "train" else (spec.serve.dtype if spec.serve else "bfloat16"),
        "passes": state.applied,
        "roles": _roles(state),
        "ranks": _ranks(spec),
        "parameters": [_param(p) for p in state.params.values()],
        "experts": state.plan.get("experts"),
        "partition": state.plan["partition"],
        "grad_buckets": state.plan["grad_buckets"],
        "memory": state.plan["memory"],
        "schedule": {"kind": par.pipeline.schedule, "microbatches": par.pipeline.microbatches,
                     "virtual_stages": par.pipeline.virtual_stages, "n_stages": n_stages,
                     "files": {"compute_only_csv": "schedule.csv", "full": "actions.txt"},
                     "simulation": {"makespan": sim.makespan, "busy": sim.busy,
                                    "bubble_fraction": sim.bubble_fraction, "cost_units": COST}},
        "cost": report,
    }
    programs = render_programs(state)
    for role in plan["roles"]:
        role["program"] = f"programs/{role['name']}.py"
    return {
        **programs,
        "plan.json": _dump(plan),
        "spec.json": json.dumps(resolved(spec), indent=1, sort_keys=True) + "\n",
        "schedule.csv": to_csv(compute),
        "actions.txt": _actions_text(state, lowered),
    }


def _order_collectives(state: CompileState) -> None:
    """Put each stage's collectives in the order the forward pass issues them (graph order of their site)."""
    position = {n.target: i for i, n in enumerate(state.graph.graph.nodes) if n.op == "call_module"}
    split_first = {"split_tokens": 0, "all_to_all": 1, "all_gather": 2}

    def key(c: dict[str, Any]) -> tuple[int, int]:
        site = c["site"]
        exact = position.get(site)
        if exact is None:  # a block-level site: where the block's first call is
            exact = min((i for t, i in position.items() if t.startswith(site + ".")), default=len(position))
            if c["op"] == "all_gather" and not c.get("zero"):
                exact = max((i for t, i in position.items() if t.startswith(site + ".")), default=exact)
        return exact, -1 if c.get("zero") else split_first.get(c["op"], 1)

    for stage, ops in state.collectives.items():
        state.collectives[stage] = sorted(ops, key=key)


def _identity_backward(c: dict[str, Any]) -> bool:
    return c["site"] == "embed" and c["op"] == "all_reduce"


def _dump(plan: dict[str, Any]) -> str:
    """Indented JSON, except that each rank row stays on one line (2,048 rows would be 20,000 lines)."""
    rows = plan["ranks"]["rows"]
    plan = dict(plan, ranks=dict(plan["ranks"], rows="@ROWS@"))
    text = json.dumps(plan, indent=1, sort_keys=True)
    body = ",\n".join("   " + json.dumps(r, separators=(",", ":")) for r in rows)
    return text.replace('"@ROWS@"', "[\n" + body + "\n  ]") + "\n"


def _ranks(spec: Spec) -> dict[str, Any]:
    par, per_node = spec.parallelism, spec.cluster.gpus_per_node
    rows = []
    for r in range(par.world_size):
        c = coords(par, per_node, r)
        rows.append([r, c.pp, c.dp, c.tp, c.ep, c.edp, c.node])
    return {"columns": ["rank", "pp", "dp", "tp", "ep", "edp", "node"], "rows": rows,
            "roles_of_pp_rank": {str(p): [f"stage{s}" for s in range(p, par.n_stages, par.pp)]
                                 for p in range(par.pp)}}


def _param(p) -> dict[str, Any]:
    local = list(p.shape)
    if p.shard is not None:
        local[p.shard["dim"]] //= p.shard["parts"]
    return {"name": p.name, "global_shape": list(p.shape), "local_shape": local, "stages": p.stages,
            "shard": p.shard, "expert": p.expert, "grad_reduce": p.grad_reduce, "serve": p.serve, "zero": p.zero}


def _roles(state: CompileState) -> list[dict[str, Any]]:
    spec = state.spec
    roles = []
    last = len(state.stage_bounds) - 1
    for s, (a, b) in enumerate(state.stage_bounds):
        forward = state.collectives.get(s, [])
        # the vocab-parallel embedding's all-reduce has an identity backward; every other forward
        # collective has the conjugate BACKWARD names
        backward = [dict(c, op=BACKWARD[c["op"]]) for c in reversed(forward) if not _identity_backward(c)]
        for bucket in state.plan["grad_buckets"].get(str(s), []):
            backward.append({"site": "gradients", "op": bucket["op"], "axis": "+".join(bucket["axes"]),
                             "what": f"{len(bucket['params'])} parameters, {bucket['elements']} elements"})
        roles.append({"name": f"stage{s}", "stage": s, "pp_rank": s % spec.parallelism.pp, "layers": [a, b],
                      "embedding": s == 0, "head": s == last,
                      "parameters": sorted(n for n, p in state.params.items() if s in p.stages),
                      "forward_collectives": forward, "backward_collectives": backward})
    return roles


def _actions_text(state: CompileState, lowered) -> str:
    lines = [f"# lcc per-rank schedule for {state.spec.name}: torch.distributed.pipelining actions, then",
             "# the collectives each compute action issues (forward F, backward B) and the step's gradient",
             "# reductions. Stage s runs on pipeline rank s mod pp."]
    recomputed = {"none": "", "selective": "attention cores, routing and dispatch",
                  "full": "every layer (its forward collectives again)"}
    recomputed = recomputed[state.plan["memory"]["activation_checkpointing"]]
    for r, actions in enumerate(lowered):
        lines.append(f"pp_rank {r}:")
        for a in actions:
            extra = ""
            if a.kind in ("F", "B"):
                counts: dict[str, int] = {}
                for c in state.collectives.get(a.stage, []):
                    if a.kind == "B" and _identity_backward(c):
                        continue
                    ops = [c["op"]] if a.kind == "F" else [BACKWARD[c["op"]].split(" ")[0]]
                    if a.kind == "B" and c.get("zero"):
                        ops.insert(0, "all_gather")  # ZeRO-3 gathers again what backward needs
                    for op in ops:
                        counts[f"{op}({c['axis']})"] = counts.get(f"{op}({c['axis']})", 0) + c.get("calls", 1)
                if counts:
                    extra = "  # " + ", ".join(f"{k} x{v}" for k, v in counts.items())
                if a.kind == "B" and recomputed:
                    extra += ("; " if extra else "  # ") + f"recomputes {recomputed}"
            lines.append(f"  {a}{extra}")
        for s in range(r, len(state.stage_bounds), len(lowered)):
            for bucket in state.plan["grad_buckets"].get(str(s), []):
                lines.append(f"  REDUCE_GRAD stage {s}: {bucket['op']}({'+'.join(bucket['axes'])}) "
                             f"{len(bucket['params'])} parameters, {bucket['elements']} elements")
            if state.plan["memory"]["after_step"]:
                par = state.spec.parallelism
                for axis, parts in (("dp", par.dp), ("edp", par.edp)):
                    n = sum(1 for p in state.params.values() if s in p.stages and p.zero["axis"] == axis)
                    if n and parts > 1:
                        lines.append(f"  GATHER_PARAMS stage {s}: all_gather({axis}) {n} updated parameter shards")
    return "\n".join(lines) + "\n"
