"""`lcc plan diff A B`: what changes between two plans, structured: the spec fields that differ, mesh and
roles, memory per role (worst rank first), communication by kind and by link, the pipeline and the step
estimate, expert placement, and the program lines that differ per role. Only what differs is listed: a
plan against itself gives no changes."""

from __future__ import annotations

import difflib
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from lcc.inspect.show import overview, size
from lcc.inspect.target import Target


def _flat(value: Any, path: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{path}.{k}" if path else str(k)))
        return out
    return {path: value}


def _changed(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if va != vb:
            row: dict[str, Any] = {"field": key, "a": va, "b": vb}
            if isinstance(va, int | float) and isinstance(vb, int | float) and not isinstance(va, bool) and va:
                row["ratio"] = vb / va
            rows.append(row)
    return rows


def _spec(t: Target) -> dict[str, Any]:
    return json.loads(t.text("spec.json"))


def _memory(o: dict[str, Any]) -> dict[str, Any]:
    return {r["role"]: r["memory_bytes"] for r in o["roles"]}


def _programs(a: Target, b: Target) -> dict[str, dict[str, Any]]:
    out = {}
    roles_b = {r.name: r for r in b.plan.roles}
    for role in a.plan.roles:
        if role.name not in roles_b:
            continue
        la = a.text(role.program).splitlines()
        lb = b.text(roles_b[role.name].program).splitlines()
        if la == lb:
            continue
        lines = [d for d in difflib.unified_diff(la, lb, lineterm="", n=0)
                 if d[:1] in "+-" and not d.startswith(("+++", "---"))]
        out[role.name] = {"removed": sum(d[0] == "-" for d in lines), "added": sum(d[0] == "+" for d in lines),
                          "lines": lines}
    return out


def _pipeline(o: dict[str, Any], cost: dict[str, Any]) -> dict[str, Any]:
    """The schedule and the step estimate: a training step, or a serve plan's decode step."""
    if "decode_step" in o:
        d = o["decode_step"]
        return {**o["schedule"], "decode_step_seconds": d["seconds"], "tokens_per_second": d["tokens_per_second"],
                "worst_rank_bytes": d["worst_rank_bytes"]}
    return {**o["schedule"], "step_seconds_estimate": cost["time"]["step_seconds_estimate"],
            "tokens_per_second": cost["time"]["tokens_per_second"], "utilization": cost["time"]["utilization"]}


def diff(a: Target, b: Target) -> dict[str, Any]:
    oa, ob = overview(a.plan), overview(b.plan)
    ca, cb = a.plan.cost, b.plan.cost
    worst = [{"plan": side, "rank": t.plan.cost["memory"]["worst_rank"]["rank"],
              "role": t.plan.cost["memory"]["worst_rank"]["role"],
              "peak_bytes": t.plan.cost["memory"]["worst_rank"]["peak_bytes"]} for side, t in (("a", a), ("b", b))]
    pipeline_a, pipeline_b = (_pipeline(o, c) for o, c in ((oa, ca), (ob, cb)))
    changes = {
        "spec": _changed(_flat(_spec(a)), _flat(_spec(b))),
        "mesh": _changed({**oa["mesh"], "world_size": oa["world_size"], "mode": oa["mode"], "device": oa["device"]},
                         {**ob["mesh"], "world_size": ob["world_size"], "mode": ob["mode"], "device": ob["device"]}),
        "roles": _changed({r["role"]: r["layers"] for r in oa["roles"]}, {r["role"]: r["layers"] for r in ob["roles"]}),
        "memory_by_role": _changed(_memory(oa), _memory(ob)),
        "communication": _changed(_flat(oa.get("communication_bytes_per_step", {})),
                                  _flat(ob.get("communication_bytes_per_step", {}))),
        "pipeline": _changed(pipeline_a, pipeline_b),
        "experts": _changed(oa.get("experts", {}), ob.get("experts", {})),
        "programs": _programs(a, b),
    }
    if worst[0]["peak_bytes"] != worst[1]["peak_bytes"] or worst[0]["role"] != worst[1]["role"]:
        changes["worst_rank"] = sorted(worst, key=lambda w: -w["peak_bytes"])
    changes = {k: v for k, v in changes.items() if v}
    return {"a": a.label, "b": b.label, "changes": changes}


def _value(field: str, v: Any) -> str:
    if isinstance(v, float) and ("fraction" in field or "utilization" in field or "share" in field):
        return f"{v:.1%}"
    sized = "bytes" in field or field.startswith(("by_", "total"))
    if isinstance(v, int | float) and not isinstance(v, bool) and sized:
        return size(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if not isinstance(v, str) else v


TITLES = {"spec": "spec fields", "mesh": "mesh", "roles": "roles (layers)", "memory_by_role": "memory per role",
          "communication": "communication per step", "pipeline": "pipeline and step estimate",
          "experts": "expert placement"}


def render(console: Console, d: dict[str, Any], program_lines: int = 12) -> None:
    console.print(f"[bold]a[/bold]: {d['a']}\n[bold]b[/bold]: {d['b']}")
    changes = d["changes"]
    if not changes:
        console.print("no differences")
        return
    for key, title in TITLES.items():
        rows = changes.get(key)
        if not rows:
            continue
        t = Table(title=title, title_justify="left")
        for col in ("field", "a", "b", "b / a"):
            t.add_column(col, justify="left" if col == "field" else "right")
        for r in rows:
            unit_field = r["field"] if key != "memory_by_role" else "bytes"
            t.add_row(r["field"], _value(unit_field, r["a"]), _value(unit_field, r["b"]),
                      f"{r['ratio']:.4g}x" if "ratio" in r else "")
        console.print(t)
    for w in changes.get("worst_rank", []):
        console.print(f"worst rank of {w['plan']}: rank {w['rank']} ({w['role']}), peak {size(w['peak_bytes'])}")
    for role, p in changes.get("programs", {}).items():
        console.print(f"[bold]program {role}[/bold]: {p['removed']} line(s) removed, {p['added']} added")
        for line in p["lines"][:program_lines]:
            console.print(line, markup=False, highlight=False)
        if len(p["lines"]) > program_lines:
            console.print(f"  ... {len(p['lines']) - program_lines} more (--json lists them all)")
