"""Where a spec's training data lives: `train.data.path` is relative to the spec file's folder.

The spec keeps the path as written (plans and their spec.json stay free of absolute paths, so compiling
is deterministic); the folder is known only where the spec file is, so it travels beside the spec, never in it.
"""

from __future__ import annotations

from pathlib import Path

from lcc.spec.errors import Location, Problem, SpecError
from lcc.spec.load import locate
from lcc.spec.models import Spec

FIELD = ("train", "data", "path")


def spec_folder(spec: Spec) -> Path | None:
    """The folder of the file a spec was loaded from; None for a spec built from data (a plan's spec.json)."""
    return spec._folder


def data_file(spec: Spec, spec_dir: Path | None = None) -> Path | None:
    """The text corpus or prepared folder that `train.data.path` names; None for the other kinds.

    An absolute path is used as is. A relative one is relative to the spec file's folder: `spec_dir` when
    given (a plan's spec.json does not know where its spec was, so whoever runs the plan passes the folder),
    else the folder the spec was loaded from, else (a plan folder run on its own) the working directory.
    """
    data = spec.train.data
    if data.kind not in ("text", "prepared") or not data.path:
        return None
    path = Path(data.path)
    folder = spec_dir if spec_dir is not None else spec_folder(spec)
    return path if path.is_absolute() or folder is None else folder / path


def _resolve(spec: Spec, spec_dir: Path | None, written: str) -> Path:
    path = Path(written)
    folder = spec_dir if spec_dir is not None else spec_folder(spec)
    return path if path.is_absolute() or folder is None else folder / path


def prepared_folders(spec: Spec, spec_dir: Path | None = None) -> list[tuple[Path, float]]:
    """A prepared dataset's folders with their weights (`train.data.path`, or each of `train.data.blend`)."""
    data = spec.train.data
    if data.kind != "prepared":
        return []
    if data.blend is not None:
        return [(_resolve(spec, spec_dir, b.path), b.weight) for b in data.blend]
    return [(_resolve(spec, spec_dir, data.path), 1.0)] if data.path else []


def validation_folder(spec: Spec, spec_dir: Path | None = None) -> Path | None:
    """`train.data.validation`: a prepared folder to validate on, or None (the held-out part)."""
    written = spec.train.data.validation
    return _resolve(spec, spec_dir, written) if written is not None else None


def check_data(spec: Spec, spec_dir: Path | None = None, where: Location | None = None) -> None:
    """Raise a SpecError at the data's field (`train.data.path`, a blend's path, `train.data.validation`) when
    its file or prepared folder cannot be read, before any rank starts (a rank would fail with a traceback).
    `where` names the source of a spec that did not come from a file."""
    data = spec.train.data
    checks: list[tuple[tuple, str, Path]] = []
    if data.kind == "text" and data.path:
        checks.append((FIELD, data.path, data_file(spec, spec_dir)))
    if data.kind == "prepared":
        if data.blend is not None:
            checks += [(("train", "data", "blend", i, "path"), b.path, f / "manifest.json")
                       for i, (b, (f, _)) in enumerate(zip(data.blend, prepared_folders(spec, spec_dir), strict=True))]
        elif data.path:
            checks.append((FIELD, data.path, data_file(spec, spec_dir) / "manifest.json"))
        if data.validation is not None:
            checks.append((("train", "data", "validation"), data.validation,
                           validation_folder(spec, spec_dir) / "manifest.json"))
    for field, written, path in checks:
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            folder = spec_dir if spec_dir is not None else spec_folder(spec)
            if Path(written).is_absolute():
                hint = None
            elif folder is not None:
                hint = f"a relative path is read from the spec file's folder, {folder}"
            else:
                hint = "a compiled plan folder run on its own reads a relative path from the working directory"
            what = (f"no prepared dataset at {path.parent} (lcc data prepare writes one)" if data.kind == "prepared"
                    else f"cannot read data file {path}: {exc.strerror or exc}")
            raise SpecError([Problem(where or locate(spec, field), field, what, hint)]) from None
