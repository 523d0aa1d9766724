"""Writing compiled plans, and comparing them with what is on disk (`lcc compile --check`)."""

from __future__ import annotations

import os
from pathlib import Path


def write(files: dict[str, str], out: Path) -> None:
    """Write each file atomically (a reader never sees half a plan file)."""
    for rel, text in sorted(files.items()):
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


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
    if out.is_dir():
        produced = {Path(rel).parts[0] for rel in files}
        extra = sorted(p.name for p in out.iterdir() if p.name not in produced and p.name != "serve")
        if extra:
            return f"{out / extra[0]}: not produced by the compiler"
    return None
