"""Errors a user can act on: every problem names where it is, what was expected and, if possible, a fix."""

from __future__ import annotations

from dataclasses import dataclass, field

Path = tuple[str | int, ...]


def dotted(path: Path) -> str:
    """`('model', 'moe', 'layers', 2)` -> `model.moe.layers[2]`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "<spec>"


@dataclass(frozen=True)
class Location:
    """Where a value came from: a file position, or a command-line override."""

    source: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        if self.line is None:
            return self.source
        return f"{self.source}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Problem:
    location: Location
    path: Path
    message: str
    hint: str | None = None
    related: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        text = f"{self.location}: {dotted(self.path) + ': ' if self.path else ''}{self.message}"
        if self.related:
            text += f" (see also {', '.join(self.related)})"
        if self.hint:
            text += f"\n    hint: {self.hint}"
        return text


class SpecError(Exception):
    """One or more problems with a spec. Its text is meant for the user, not for a traceback."""

    def __init__(self, problems: list[Problem]):
        if not problems:
            raise ValueError("SpecError needs at least one problem")
        self.problems = problems
        super().__init__(self.render())

    def render(self, limit: int = 50) -> str:
        head = "1 problem" if len(self.problems) == 1 else f"{len(self.problems)} problems"
        lines = [f"  {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        return f"invalid spec ({head}):\n" + "\n".join(lines)

    @property
    def first(self) -> Problem:
        return self.problems[0]
