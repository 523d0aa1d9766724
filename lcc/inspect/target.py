"""What `lcc plan` commands take: a compiled plan folder, or a spec (compiled in memory, with `--set`
overrides and a mode). Bad input is one line and exit code 2 (`InspectError`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lcc.plan import PlanFormatError, loads, read_plan
from lcc.plan.types import Plan
from lcc.spec.models import Spec


class InspectError(Exception):
    """A target or option a `lcc plan` command cannot use: its message is the whole story, exit code 2."""

    exit_code = 2


@dataclass
class Target:
    plan: Plan
    label: str  # the folder, or the spec file with its overrides
    folder: Path | None = None
    files: dict[str, str] = field(default_factory=dict)  # a spec's compiled files (a folder reads its own)

    def text(self, name: str) -> str:
        """A file of the plan (a program, schedule.csv, ...)."""
        if name in self.files:
            return self.files[name]
        if self.folder is not None and (self.folder / name).is_file():
            return (self.folder / name).read_text()
        raise InspectError(f"{self.label}: the plan has no {name}")


def load(path: Path, mode: str = "train", sets: list[str] | None = None) -> Target:
    return prepare(path, mode, sets)()


def prepare(path: Path, mode: str = "train", sets: list[str] | None = None) -> Callable[[], Target]:
    """What builds the target, once the input is checked: a plan folder read, a spec validated. Compiling
    (which imports torch: seconds) comes after, so that a command given several targets refuses a bad one at
    once, as `lcc validate` does, rather than after compiling the others."""
    path = Path(path)
    if path.is_dir():
        if sets:
            raise InspectError(f"{path}: --set changes a spec; this is a compiled plan folder (give the spec)")
        for name in ("plan.json", "spec.json"):
            if not (path / name).is_file():
                raise InspectError(f"{path / name}: missing (not a compiled plan folder: lcc compile writes one)")
        try:
            target = Target(read_plan(path), str(path), folder=path)
        except PlanFormatError as exc:
            raise InspectError(f"{exc}; compile the spec again") from None
        return lambda: target
    if not path.is_file():
        raise InspectError(f"{path}: no such file or folder (give a compiled plan folder or a spec)")
    if mode not in ("train", "serve"):
        raise InspectError(f"--mode {mode}: train or serve")
    from lcc.spec import load_spec

    spec = load_spec(path, sets or [])  # SpecError: the caller prints it, exit 2
    label = " ".join([str(path), *(f"--set {s}" for s in sets or [])]) + (" (serve)" if mode == "serve" else "")
    return lambda: _compiled(spec, mode, label)


def _compiled(spec: Spec, mode: str, label: str) -> Target:
    from lcc.compiler.plan import compile_plan

    files = compile_plan(spec, mode)  # SpecError (a rule only the compiler checks): the caller prints it
    return Target(loads(files["plan.json"]), label, files=files)
