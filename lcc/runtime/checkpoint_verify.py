"""Checking a checkpoint before anything loads it: every file it was saved with is there with its size and
sha256, and it is of the spec that will use it (the same training, to resume; the same model and routing, to
serve or to start a run from its weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lcc.runtime.checkpoint_dir import resolve
from lcc.runtime.checkpoint_files import IDENTITY, CheckpointError, sha256
from lcc.runtime.checkpoint_identity import IGNORED, read_identity, shown_value, spec_differences, spec_hash


class SpecMismatch(CheckpointError):
    """A checkpoint of another spec: never skipped for an older one, which would be of that spec too."""


def verify(path: Path, ident: dict[str, Any] | None = None) -> None:
    """Every file checkpoint folder `path` lists in its identity is there with the size and sha256 it was
    saved with (sizes first: a truncated file is found before any is read). Raises CheckpointError naming
    the first file that is not."""
    path = Path(path)
    ident = read_identity(path) if ident is None else ident
    files = ident.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{path / IDENTITY}: lists no files to check")
    for name, saved in sorted(files.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (the checkpoint was saved with it)")
        size = file.stat().st_size
        if size != saved["bytes"]:
            how = "truncated" if size < saved["bytes"] else "changed"
            raise CheckpointError(f"{file}: {how}: {size} bytes, {saved['bytes']} when it was saved")
    for name, saved in sorted(files.items()):
        try:
            digest = sha256(path / name)
        except OSError as exc:
            raise CheckpointError(f"{path / name}: unreadable ({exc.strerror})") from None
        if digest != saved["sha256"]:
            raise CheckpointError(f"{path / name}: corrupt: its sha256 differs from the one recorded when it was "
                                  "saved")


def check_resumable(path: Path, spec: dict[str, Any]) -> None:
    """Checkpoint folder `path` can be resumed by a run of `spec`: an lcc checkpoint of the same spec up to
    the layout (SpecMismatch otherwise), its spec_hash matching its spec, and every file intact."""
    saved = read_identity(path)
    diffs = spec_differences(saved.get("spec", {}), spec)
    if diffs:
        was, now = saved.get("spec", {}).get("name"), spec.get("name")
        of = f"a checkpoint of {was}, not of {now}" if was != now else "a checkpoint of another run"
        lines = [f"  {p}: {shown_value(a)} in the checkpoint, {shown_value(b)} in this run" for p, a, b in diffs]
        raise SpecMismatch(f"{path}: cannot resume from {of}: its spec differs in more than the layout "
                           "(parallelism, cluster; train.checkpoint_every and collective_timeout_s may change "
                           "too):\n" + "\n".join(lines))
    if saved.get("spec_hash") != spec_hash(saved.get("spec", {})):
        raise CheckpointError(f"{path / IDENTITY}: its spec_hash does not match its spec (changed after the save)")
    verify(path, saved)


def check_checkpoint(path: Path, spec: dict[str, Any], files: bool = True) -> tuple[Path, dict[str, Any]]:
    """The checkpoint folder `path` names (or a checkpoint directory's latest), checked: complete (with
    `files`: every file's size and sha256), and of the same model and routing as `spec` (any layout, any
    training settings): what serving a checkpoint, or starting a training run from its weights, needs."""
    folder = resolve(Path(path))
    ident = read_identity(folder)
    if files:
        verify(folder, ident)
    saved = {k: ident["spec"].get(k) for k in ("model", "routing")}
    mine = {k: spec.get(k) for k in ("model", "routing")}
    diffs = [d for d in spec_differences(saved, mine) if not d[0].startswith(IGNORED)]
    if diffs:
        field, a, b = diffs[0]
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise CheckpointError(f"{folder}: the checkpoint is of another model: {field} is {a!r} there, "
                              f"{b!r} in the spec{more}")
    return folder, ident
