"""`lcc checkpoint info`: the typer command (registered by lcc.cli) and its text; the work is in
lcc.runtime.checkpoint_info."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer


def checkpoint_info(
    ckpt: Annotated[Path, typer.Argument(metavar="CKPT", help="A checkpoint folder (step-NNNNNN), or a "
                                         "--checkpoint-dir folder (its latest checkpoint).", show_default=False)],
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor: global shape, dtype, size and "
                                          "the chunks it was saved in.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON (schema lcc.checkpoint-info/1).")] = False,
) -> None:
    """What a checkpoint holds, the spec it came from and the layout it was saved in."""
    from lcc.runtime.checkpoint_files import CheckpointError
    from lcc.runtime.checkpoint_info import describe

    try:
        data = describe(ckpt)
    except CheckpointError as exc:
        typer.echo(f"lcc checkpoint info: {exc}", err=True)
        raise typer.Exit(2) from None
    if not tensors:
        del data["tensors"]
    if as_json:
        typer.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    for line in _checkpoint_lines(data):
        typer.echo(line)


def _checkpoint_lines(data: dict[str, Any]) -> list[str]:
    from lcc.report_view import gib

    spec, lay = data["spec"], data["layout"]
    model, train = spec.get("model", {}), spec.get("train", {})
    moe = model.get("moe") or {}
    experts = f", {moe['n_experts']} experts per MoE layer" if moe else ""
    pipe = lay["pipeline"]
    virtual = f", {pipe['virtual_stages']} virtual stages per rank" if pipe["virtual_stages"] > 1 else ""
    step = data["step"]
    out = [f"{data['path']}: {data['spec_name']}, {step} optimizer step{'' if step == 1 else 's'} taken",
           f"spec: {model.get('n_layers')} layers, d_model {model.get('d_model')}{experts}; {train.get('dtype')}, "
           f"seq_len {train.get('seq_len')}, global batch {train.get('global_batch')}, lr "
           f"{train.get('optimizer', {}).get('lr')} (--json prints it whole)",
           f"saved under: world {lay['world_size']} = pp {lay['pp']} x dp {lay['dp']} x tp {lay['tp']}; ep {lay['ep']} "
           f"(edp {lay['edp']}); ZeRO-{lay['zero']}; sequence parallel {'on' if lay['sequence_parallel'] else 'off'}; "
           f"activation checkpointing {lay['activation_checkpointing']}; {pipe['schedule']} x "
           f"{pipe['microbatches']} micro-batches{virtual}; {lay['device']}",
           "holds (global tensors, each element saved once):"]
    holds = data["holds"]
    total_n, total_b = sum(h["tensors"] for h in holds.values()), sum(h["bytes"] for h in holds.values())
    for kind, h in [*holds.items(), ("total", {"tensors": total_n, "bytes": total_b})]:
        out.append(f"  {kind:<6} {h['tensors']:>5} tensors {gib(h['bytes']):>11}")
    if "tensors" in data:
        rows = [(t["key"], "x".join(map(str, t["shape"])) if t["shape"] else "scalar" if t["shape"] == [] else "-",
                 t["dtype"], gib(t["bytes"]), str(t["chunks"])) for t in data["tensors"]]
        rows.insert(0, ("key", "shape", "dtype", "size", "chunks"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        for r in rows:
            out.append("  " + "  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                                        for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())
    return out
