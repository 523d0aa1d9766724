"""Writing compiled plans, and comparing them with what is on disk (`lcc compile --check`)."""

from __future__ import annotations

import os
from pathlib import Path

PROGRAMS = "programs"


def stale_programs(files: dict[str, str], out: Path) -> list[Path]:
    """Programs in `out/programs/` that the compiler did not produce this time (left by an older layout, e.g.
    stage3.py after pp 4 -> 2): a plan folder must not carry programs its plan does not name.

    Only `*.py` entries directly inside `out/programs/` count; never a folder, never anything else, and
    nothing at all when `programs` is a link (it could point outside the output folder).
    """
    folder = out / PROGRAMS
    if folder.is_symlink() or not folder.is_dir():
        return []
    produced = {Path(rel).name for rel in files if Path(rel).parent == Path(PROGRAMS)}
    return sorted(p for p in folder.iterdir()
                  if p.suffix == ".py" and p.name not in produced and (p.is_symlink() or p.is_file()))


def write(files: dict[str, str], out: Path) -> list[Path]:
    """Write each file atomically (a reader never sees half a plan file), then remove stale programs.
    Returns the programs removed."""
    for rel, text in sorted(files.items()):
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    stale = stale_programs(files, out)
    for path in stale:
        path.unlink()
    return stale


def first_difference(files: dict[str, str], out: Path) -> str | None:
    """None when `out` holds exactly these files with these bytes; else where they first differ."""
    for rel, text in sorted(files.items()):
        path = out / rel
        if not path.is_file():
            return f"{path}: missing"
        old = path.read_text()
        if old == text:
            continue
        old_lines, new_lines = old.splitlines(), text.splitlines()
        for i, (a, b) in enumerate(zip(old_lines, new_lines, strict=False), 1):
            if a != b:
                return f"{path}:{i}: differs\n  on disk:  {a[:200]}\n  compiled: {b[:200]}"
        return f"{path}:{min(len(old_lines), len(new_lines)) + 1}: differs in length"
    stale = stale_programs(files, out)
    if stale:
        return f"{stale[0]}: not produced by the compiler (a stale program; lcc compile removes it)"
    if out.is_dir():
        produced = {Path(rel).parts[0] for rel in files}
        extra = sorted(p.name for p in out.iterdir() if p.name not in produced and p.name != "serve")
        if extra:
            return f"{out / extra[0]}: not produced by the compiler"
    return None
