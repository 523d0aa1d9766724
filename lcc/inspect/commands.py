"""`lcc plan show | diff | export | search`: the typer commands (registered by lcc.cli); the work is in lcc.inspect
and lcc.search."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

plan_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                       help="Look at plans: show a rank or role, diff two layouts, export for other tools; "
                       "search layouts.")

TargetArg = Annotated[Path, typer.Argument(metavar="SPEC|PLAN_DIR", help="A spec (compiled in memory), or a "
                                           "compiled plan folder.", show_default=False)]
ModeOpt = Annotated[str, typer.Option("--mode", help="For a spec: train or serve.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", metavar="FIELD=VALUE",  # noqa: UP007
                                                  help="For a spec: override a field (repeatable).")]


def _guard(fn: Any, *args: Any) -> Any:
    """Run fn; bad input (an unusable target or option, an invalid spec) is its message and exit code 2."""
    from lcc.inspect.target import InspectError
    from lcc.spec import SpecError

    try:
        return fn(*args)
    except InspectError as exc:
        typer.echo(f"lcc: {exc}", err=True)
        raise typer.Exit(2) from None
    except SpecError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


@plan_app.command("show")
def show(
    target: TargetArg,
    rank: Annotated[int | None, typer.Option("--rank", help="One rank: coordinates, shards, collectives, memory.")] = None,  # noqa: UP007,E501
    role: Annotated[str | None, typer.Option("--role", help="One role (pipeline stage), e.g. stage0.")] = None,  # noqa: UP007
    all_ranks: Annotated[bool, typer.Option("--all-ranks", help="Every rank's coordinates, node, roles, experts "
                                            "and memory (with --json).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    mode: ModeOpt = "train",
    set_: SetOpt = None,
) -> None:
    """The layout at a glance, or one rank's or role's share of it."""
    from rich.console import Console

    from lcc.inspect import show as view
    from lcc.inspect.target import load

    def run() -> None:
        t = load(target, mode, set_)
        if rank is not None:
            view.check_rank(t.plan, rank)
        if all_ranks:
            if not as_json:
                raise view.InspectError("--all-ranks prints JSON: add --json")
            data: Any = view.all_ranks(t.plan)
        elif rank is not None:
            data = view.rank_facts(t.plan, rank)
        elif role is not None:
            data = view.role_facts(t.plan, role)
        else:
            data = view.overview(t.plan)
        if as_json:
            typer.echo(json.dumps(data, indent=1, sort_keys=True))
            return
        console = Console(width=120)
        if rank is not None:
            view.render_rank(console, data)
        elif role is not None:
            view.render_role(console, data)
        else:
            view.render_overview(console, t, data)

    _guard(run)


@plan_app.command("diff")
def diff_cmd(
    a: Annotated[Path, typer.Argument(metavar="A", help="A plan folder or a spec.", show_default=False)],
    b: Annotated[Path, typer.Argument(metavar="B", help="Another plan folder or spec (the same spec with --set-b).",
                                      show_default=False)],
    set_a: Annotated[list[str] | None, typer.Option("--set-a", metavar="FIELD=VALUE",  # noqa: UP007
                                                    help="Override a field of spec A (repeatable).")] = None,
    set_b: Annotated[list[str] | None, typer.Option("--set-b", metavar="FIELD=VALUE",  # noqa: UP007
                                                    help="Override a field of spec B (repeatable).")] = None,
    mode: ModeOpt = "train",
    as_json: Annotated[bool, typer.Option("--json", help="Print the changes as JSON.")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also draw both layouts side by side (PNG).")] = None,  # noqa: UP007,E501
) -> None:
    """What changes between two layouts or specs: spec fields, mesh, memory, communication, pipeline, experts
    and program lines."""
    from rich.console import Console

    from lcc.inspect import diff as differ
    from lcc.inspect.target import prepare

    def run() -> None:
        build_a, build_b = prepare(a, mode, set_a), prepare(b, mode, set_b)  # both checked before compiling
        ta, tb = build_a(), build_b()
        d = differ.diff(ta, tb)
        if plot is not None:
            from lcc.inspect import plot as pictures

            typer.echo(f"lcc plan diff: drawing {plot} ...", err=True)
            pictures.side_by_side(ta, tb, plot)
        if as_json:
            typer.echo(json.dumps(d, indent=1, sort_keys=True))
        else:
            differ.render(Console(width=120), d)
        if plot is not None and not as_json:
            typer.echo(f"wrote {plot}")

    _guard(run)


@plan_app.command("export")
def export_cmd(
    target: TargetArg,
    fmt: Annotated[str, typer.Option("--format", help="onnx (one model per role), perfetto (Chrome/Perfetto trace "
                                     "JSON), dot (Graphviz) or csv (torch.distributed.pipelining notation).")],
    out: Annotated[Path, typer.Option("--out", help="The file to write (onnx: a folder of <role>.onnx, or with "
                                      "--role a file).")],
    role: Annotated[str | None, typer.Option("--role", help="onnx: only this role's model.")] = None,  # noqa: UP007
    mode: ModeOpt = "train",
    set_: SetOpt = None,
) -> None:
    """Write the plan for other tools: the programs as ONNX graphs, the simulated step as a trace, the stages
    as a graph, the schedule."""
    from lcc.inspect import export as exporter
    from lcc.inspect.target import InspectError, load
    from lcc.runtime.preflight import LaunchRefused, check_writable

    def write(path: Path, data: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        except OSError as exc:
            raise InspectError(f"--out {path}: cannot write it ({exc.strerror})") from None

    def run() -> None:
        if fmt not in exporter.FORMATS:
            raise InspectError(f"--format {fmt}: one of {', '.join(exporter.FORMATS)}")
        if role is not None and fmt != "onnx":
            raise InspectError(f"--role applies to --format onnx (one model per role), not to {fmt}")
        try:  # before compiling: an --out that cannot be written is found at once
            check_writable(out, "--out", folder=fmt == "onnx" and role is None and not out.is_file())
        except LaunchRefused as exc:
            raise InspectError(str(exc)) from None
        t = load(target, mode, set_)
        if fmt == "onnx":
            from lcc.inspect.onnx_export import models

            files = models(t, role)
            if role is not None:
                write(out, files[f"{role}.onnx"])
                typer.echo(f"wrote {out} (onnx, role {role}, {len(files[f'{role}.onnx'])} bytes)")
                return
            if out.exists() and not out.is_dir():
                raise InspectError(f"--out {out}: a file; --format onnx writes one model per role into a folder "
                                   "(or give --role)")
            for name, data in files.items():
                write(out / name, data)
            typer.echo(f"wrote {', '.join(str(out / n) for n in files)} (onnx)")
            return
        text = exporter.export(t, fmt).encode()
        write(out, text)
        typer.echo(f"wrote {out} ({fmt}, {len(text)} bytes)")

    _guard(run)


@plan_app.command("search")
def search_cmd(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="The spec whose model to lay out.",
                                              show_default=False)],
    gpus: Annotated[int, typer.Option("--gpus", min=1, help="Devices to lay the model out on.", show_default=False)],
    nodes: Annotated[int | None, typer.Option("--nodes", min=1, help="Nodes they are in (default: the spec's "  # noqa: UP007
                                              "devices per node).")] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="Layouts to list (ties with the last included).")] = 10,
    objective: Annotated[str, typer.Option("--objective", help="step_time or memory (the worst rank's).")]
    = "step_time",
    fix: Annotated[list[str] | None, typer.Option("--fix", metavar="FIELD=VALUE", help="Keep only layouts with "  # noqa: UP007
                                                  "this parallelism field, e.g. parallelism.tp=8 (repeatable).")]
    = None,
    write_to: Annotated[Path | None, typer.Option("--write", help="Save the spec with the best layout here.")]  # noqa: UP007
    = None,
    prune: Annotated[bool, typer.Option("--prune/--no-prune", help="Skip layouts the bounds rule out.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (schema lcc.plan-search/1).")] = False,
    set_: SetOpt = None,
) -> None:
    """Rank every valid layout of the spec's model on --gpus devices by estimated step time (docs/search.md)."""
    import time

    from lcc.search.search import SearchError, parse_fix, search
    from lcc.search.view import as_json as to_json
    from lcc.search.view import table, write_spec
    from lcc.spec import SpecError, load_spec

    if objective not in ("step_time", "memory"):
        typer.echo(f"lcc: --objective {objective}: step_time or memory", err=True)
        raise typer.Exit(2)

    def say(message: str) -> None:  # on stderr: with --json, stdout holds the JSON alone
        typer.echo(f"lcc plan search: {message}", err=True)

    started = time.monotonic()
    try:
        spec = load_spec(spec_path, set_ or [])
        result = search(spec, gpus, nodes, top, objective, [parse_fix(f) for f in fix or []], prune, say)
    except SpecError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    except SearchError as exc:
        typer.echo(f"lcc plan search: {exc}", err=True)
        raise typer.Exit(2) from None
    say(f"done in {time.monotonic() - started:.1f} s ({result.evaluated:,} layouts estimated, {result.fitting:,} "
        "fit)")
    if as_json:
        typer.echo(json.dumps(to_json(result), indent=2))
    else:
        for line in table(result):
            typer.echo(line)
    if write_to is not None:
        write_spec(spec, result, write_to)
        typer.echo(f"wrote {write_to}", err=as_json)
