"""`lcc calibrate` (registered by lcc.cli); `lcc plan search` is with the other `lcc plan` commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def calibrate(
    ranks: Annotated[int, typer.Option("--ranks", min=1, max=256, help="Local ranks measuring at once (as many "
                                       "as the runs to predict).")] = 1,
    seconds: Annotated[float, typer.Option("--seconds", min=0.01, max=60, help="Time per measured point (about "
                                           "150 points).")] = 0.2,
    device: Annotated[str | None, typer.Option("--device", help="cpu or cuda (default: cuda where a GPU is "  # noqa: UP007
                                               "visible, else cpu).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Matmul dtype: float32, bfloat16 or float64.")] = "float32",
    spec: Annotated[Path | None, typer.Option("--spec", help="Write this spec with the measured cluster section "  # noqa: UP007
                                              "(to --out).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the cluster section (or with --spec, the "  # noqa: UP007
                                             "whole spec) here as YAML.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the measured rates as JSON.")] = False,
    compiled: Annotated[bool, typer.Option("--compiled", help="Also time a reference layer under torch.compile "
                                           "(Inductor) against eager, which prices plans with train.compile: "
                                           "inductor (compiling takes a minute or more; implied by a --spec "
                                           "that compiles).")] = False,
) -> None:
    """Measure this machine's matmul rate, memory bandwidth, collective bandwidth and latency on local ranks
    as a spec's cluster section (docs/search.md)."""
    import yaml

    from lcc.search.calibrate import calibrated_spec, cluster_section, measure, written
    from lcc.spec import SpecError, load_spec

    if dtype not in ("float32", "bfloat16", "float64"):
        typer.echo(f"lcc calibrate: --dtype {dtype}: float32, bfloat16 or float64", err=True)
        raise typer.Exit(2)
    if device not in (None, "cpu", "cuda"):
        typer.echo(f"lcc calibrate: --device {device}: cpu or cuda", err=True)
        raise typer.Exit(2)
    if spec is not None and out is None:
        typer.echo("lcc calibrate: --spec writes a spec: give --out", err=True)
        raise typer.Exit(2)
    try:
        base = load_spec(spec) if spec is not None else None
    except SpecError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    device = device or _default_device()
    compiled = compiled or (base is not None and base.train.compile == "inductor")
    if compiled and dtype == "float64":
        typer.echo("lcc calibrate: --compiled with --dtype float64: float64 runs stay eager (train.compile applies "
                   "to float32 and bfloat16)", err=True)
        raise typer.Exit(2)
    if compiled and device == "cpu":
        from lcc.runtime.compiled import cxx_compiler

        if cxx_compiler() is None:
            typer.echo("lcc calibrate: --compiled: torch.compile on CPU needs a C++ compiler and none was found "
                       "($CXX, c++, g++, clang++): install one (apt install g++), or calibrate without --compiled",
                       err=True)
            raise typer.Exit(2)
    if device == "cuda":
        import torch

        if torch.cuda.device_count() < ranks:
            typer.echo(f"lcc calibrate: --device cuda --ranks {ranks}: this machine has "
                       f"{torch.cuda.device_count()} CUDA GPU(s) visible (one rank a GPU)", err=True)
            raise typer.Exit(2)
    try:
        rates = measure(ranks, seconds, dtype, device, compiled)
    except RuntimeError as exc:
        typer.echo(f"lcc calibrate: {exc}", err=True)
        raise typer.Exit(1) from None
    cluster = cluster_section(rates)
    text = yaml.safe_dump({"cluster": cluster}, sort_keys=False, default_flow_style=None, width=110)
    typer.echo(json.dumps({**rates, "cluster": cluster}, indent=2) if as_json else text.rstrip())
    if out is not None:
        if base is not None:
            text = calibrated_spec(base, cluster, ranks)
        out.write_text(text)
        typer.echo(written(out, base, cluster, ranks), err=True)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
