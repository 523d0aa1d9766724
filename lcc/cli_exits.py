"""How the `lcc` commands end on bad input: the message on stderr and exit code 2 (an invalid spec, a folder
that is not a compiled plan), or a run's error with its own exit code (RunError.exit_code)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from lcc.spec import Spec, SpecError, load_spec

T = TypeVar("T")


def load_or_exit(spec: Path, overrides: list[str] | None) -> Spec:
    """The spec file `spec` with `overrides` applied, or exit 2 with the SpecError's located text."""
    try:
        return load_spec(spec, overrides or [])
    except SpecError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


def exit_on_run_error(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, or exit with the RunError's code (2 for a refusal before launch) and its text."""
    from lcc.runtime.support import RunError

    try:
        return fn(*args)
    except RunError as exc:
        typer.echo(f"lcc: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None


def exit_on_spec_error(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, or exit 2 with the SpecError's located text."""
    try:
        return fn(*args)
    except SpecError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


def plan_spec(plan_dir: Path) -> Spec:
    """The resolved spec a compiled plan folder carries (spec.json)."""
    path = plan_dir / "spec.json"
    for name in ("plan.json", "spec.json"):
        if not (plan_dir / name).is_file():
            typer.echo(f"{plan_dir / name}: missing (not a compiled plan folder: lcc compile writes one)", err=True)
            raise typer.Exit(2)
    try:
        return Spec.model_validate(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:  # json's and pydantic's errors are ValueErrors
        typer.echo(f"{path}: not a plan folder this lcc can run ({type(exc).__name__}); compile the spec again",
                   err=True)
        raise typer.Exit(2) from None
