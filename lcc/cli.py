"""The `lcc` command. The only place that strings the parts together; heavy imports stay inside commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from lcc.spec import SpecError, load_spec

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Compile Mixture-of-Experts model specs into parallel plans, and report what they cost.",
)

SpecArg = Annotated[Path, typer.Argument(help="The spec file (YAML).", show_default=False)]
SetOpt = Annotated[
    list[str] | None,  # noqa: UP007 - typer needs Optional here
    typer.Option("--set", help="Override a field before validation: --set parallelism.dp=8 (repeatable)."),
]


def _load(spec: Path, overrides: list[str] | None):
    try:
        return load_spec(spec, overrides or [])
    except SpecError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


@app.command()
def validate(spec: SpecArg, set_: SetOpt = None) -> None:
    """Check a spec: field types, ranges and cross-field rules. Exit 2 with file:line:col on a problem."""
    loaded = _load(spec, set_)
    par = loaded.parallelism
    typer.echo(f"{spec}: ok ({loaded.name}: world {par.world_size} = pp {par.pp} x dp {par.dp} x tp {par.tp}, "
               f"ep {par.ep})")


@app.command()
def schema() -> None:
    """Print the spec's JSON Schema (for editors: yaml-language-server)."""
    from lcc.spec.schema import json_schema

    typer.echo(json.dumps(json_schema(), indent=2, sort_keys=True))


@app.command()
def report(
    spec: SpecArg,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON (schema lcc.report/1).")] = False,
) -> None:
    """Parameters, per-rank memory, FLOPs, communication, bubble and step time of a spec (no torch)."""
    from lcc.compiler.cost import cost_report

    loaded = _load(spec, set_)
    data = cost_report(loaded)
    if as_json:
        typer.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    from rich.console import Console

    from lcc.report_view import render

    render(data, Console(width=120))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
