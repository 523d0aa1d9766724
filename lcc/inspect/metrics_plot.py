"""`lcc plot METRICS.jsonl --out loss.png`: a training run's metrics over its steps (matplotlib, the `plot`
extra): the training loss and, where the run validated (`train.eval_every`), the validation loss; the
learning rate; the gradient norm before clipping; and the expert load balance (max / mean tokens per
expert: the worst MoE layer and the mean over layers; 1 is perfectly even)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from lcc.inspect.plot import _pyplot
from lcc.inspect.target import InspectError


def read_records(path: Path) -> list[dict[str, Any]]:
    """The metrics file's step records in step order (a resumed run's later records win); InspectError
    naming the line that is not a record."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InspectError(f"{path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    by_step: dict[int, dict[str, Any]] = {}
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            by_step[int(record["step"])] = record
            float(record["loss"])
        except (ValueError, KeyError, TypeError):
            raise InspectError(f"{path}:{n}: not a step record of lcc run train --metrics") from None
    if not by_step:
        raise InspectError(f"{path}: no step records")
    return [by_step[s] for s in sorted(by_step)]


def draw(records: list[dict[str, Any]], out: Path, title: str) -> None:
    plt = _pyplot()
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    loss, lr, norm, balance = axes.flat
    loss.plot(steps, [r["loss"] for r in records], label="training", color="#4C72B0")
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        loss.plot(*zip(*val, strict=True), "o-", label="validation", color="#DD8452")
    loss.set_ylabel("cross-entropy per token")
    loss.legend()
    lr.plot(steps, [r.get("lr") for r in records], color="#55A868")
    lr.set_ylabel("learning rate")
    norm.plot(steps, [r.get("grad_norm") for r in records], color="#C44E52")
    norm.set_ylabel("gradient norm (before clipping)")
    routers = [list(r.get("router", {}).values()) for r in records]
    if any(routers):
        balance.plot(steps, [max((x["imbalance_expert"] for x in rs), default=1.0) for rs in routers],
                     label="worst layer", color="#8172B2")
        balance.plot(steps, [sum(x["imbalance_expert"] for x in rs) / max(len(rs), 1) for rs in routers],
                     label="mean of layers", color="#937860")
        balance.legend()
    balance.set_ylabel("expert load: max / mean")
    for ax in (norm, balance):
        ax.set_xlabel("step")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_command(
    metrics: Annotated[Path, typer.Argument(help="The metrics file of lcc run train (--metrics).",
                                            show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="The picture to write (PNG).", show_default=False)],
) -> None:
    """Draw a run's training and validation loss, learning rate, gradient norm and expert load balance over
    its steps."""
    try:
        records = read_records(metrics)
        draw(records, out, f"{metrics.name}: steps {records[0]['step']}-{records[-1]['step']}")
    except InspectError as exc:
        typer.echo(f"lcc plot: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {out}")
