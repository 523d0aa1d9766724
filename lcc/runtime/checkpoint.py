"""Checkpoints with torch.distributed.checkpoint: every rank writes the blocks it holds, nothing is gathered.

Keys are layout-free (`model/<param>`, `optim/<param>/exp_avg`, ...; lcc.runtime.checkpoint_layout), so a
checkpoint saved under one layout loads under any other of the same spec. Next to DCP's files,
`lcc-checkpoint.json` says what the checkpoint is: its format, the step, the resolved spec it was
trained from and the layout it was saved in. A resume is refused before any rank starts when the spec
differs in anything but the layout (`check_resume`).

A checkpoint is written into `step-NNNNNN.tmp/`, renamed when every rank is done, and only then named in
`latest`: a crash mid-save leaves the previous checkpoint usable. The identity lists every file DCP wrote
with its size and sha256, which a resume checks before any rank starts (`resume_point`). The launcher holds
the directory's lock (`locked`) for the whole run, removes interrupted saves when it starts (`prepare`), and
rank 0 removes checkpoints beyond the newest `keep` after each save (`prune`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException

import lcc
from lcc.runtime.support import RunError

LATEST = "latest"
IDENTITY = "lcc-checkpoint.json"
LOCK = ".lock"
SCHEMA = "lcc.checkpoint/2"
COMPLETE = re.compile(r"step-(\d+)")  # a checkpoint folder; `step-N.tmp` and others are not complete
# spec fields that are layout, or that do not change what training computes (top-level sections, and
# how often to save and how long to wait on a collective)
LAYOUT_SECTIONS = ("name", "parallelism", "cluster", "serve")
OPERATIONAL = ("train.checkpoint_every", "train.collective_timeout_s")
KINDS = ("model", "optim", "bias", "meta")
# training-only routing fields: a checkpoint's weights serve, or start a run, whatever they were
IGNORED = ("routing.balance", "routing.capacity_factor")


class CheckpointError(RunError):
    """A path that is not a checkpoint lcc can read, or one this run may not resume from."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


# ------------------------------------------------------------------------------------ save and load
@dataclass(frozen=True)
class Resume:
    """What the ranks do with the checkpoint directory, as the launcher decided before they started: load
    checkpoint folder `path` (None: start at step 0), and keep the newest `keep` checkpoints after each save
    (0: all). `init_from`: starting at step 0, take the weights (and load biases) of this checkpoint folder,
    with a fresh optimizer."""

    path: str | None = None
    keep: int = 0
    init_from: str | None = None


def save(directory: Path, step: int, state: dict[str, Any], rank: int, identity: dict[str, Any],
         keep: int = 0) -> Path:
    """Write `state` (this rank's part, lcc.runtime.checkpoint_layout.rank_state) as the checkpoint after
    `step` optimizer steps; rank 0 adds `identity` with every file's size and sha256 (each rank hashes the
    files it wrote) as lcc-checkpoint.json, and the RNG state (one copy). A save that fails (a full disk:
    OSError ENOSPC) raises a CheckpointError and leaves `latest` naming the previous checkpoint. `keep`:
    then remove all but the newest `keep`."""
    directory = Path(directory)
    final = directory / f"step-{step:06d}"
    tmp = directory / f"step-{step:06d}.tmp"
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # an earlier attempt's files would be listed as this checkpoint's
            _remove(tmp)
    if rank != 0:
        state = {k: v for k, v in state.items() if k != "meta/rng"}
    _barrier()
    try:
        with _single_process_quiet():
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not _distributed())
        files = _files(tmp, rank, dist.get_world_size() if _distributed() else 1)
    except CheckpointException as exc:  # every rank raises it once all are done, with each failing rank's error
        message = f"{_failed(tmp, step)}:\n{_failures(exc)}"
        message += _full(directory, message)
        if rank == 0:  # give back the space the partial files hold
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(message) from None
    except OSError as exc:
        raise CheckpointError(f"{_failed(tmp, step)}: {exc}" + _full(directory, str(exc))) from None
    if _distributed():
        parts: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(files, parts, dst=0)
        files = {name: f for part in parts or [] for name, f in part.items()}
    if rank == 0:
        try:
            record = {**identity, "files": dict(sorted(files.items()))}
            _write_synced(tmp / IDENTITY, json.dumps(record, indent=2, sort_keys=True) + "\n")
            _publish(directory, tmp, final)
        except OSError as exc:
            raise CheckpointError(f"{_failed(tmp, step)}: {exc}" + _full(directory, str(exc))) from None
        try:
            prune(directory, keep, step)
        except OSError as exc:
            raise CheckpointError(f"{directory}: removing the checkpoints beyond the newest {keep} failed: {exc}"
                                  ) from None
    _barrier()
    return final


def _failed(tmp: Path, step: int) -> str:
    pointer = tmp.parent / LATEST
    try:
        name = pointer.read_text().strip()
    except OSError:
        name = ""
    where = (f"{pointer} names it" if name == f"step-{step:06d}" else f"{pointer} still names {name}" if name
             else "there is no earlier checkpoint")
    return f"{tmp}: saving the checkpoint of step {step} failed ({where})"


def _publish(directory: Path, tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`, then name it in `latest`. A `final` already there (a step saved again after
    resuming from an earlier checkpoint) is moved aside first and removed last."""
    aside = final.with_name(final.name + ".old.tmp")
    if final.exists():
        if aside.exists():
            _remove(aside)
        os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except OSError:
        if aside.exists():
            os.replace(aside, final)
        raise
    _sync_folder(directory)
    pointer = directory / (LATEST + ".tmp")
    _write_synced(pointer, final.name + "\n")
    os.replace(pointer, directory / LATEST)
    _sync_folder(directory)
    if aside.exists():
        _remove(aside)


def _full(directory: Path, message: str) -> str:
    """A full disk, when an error that it caused does not say so (torch.save's writer reports a failed
    write as `unexpected pos`)."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return ""
    if free >= 1 << 20 or os.strerror(errno.ENOSPC) in message:
        return ""
    return f"\n  {os.strerror(errno.ENOSPC)}: {free} bytes free on the filesystem of {directory}"


def _failures(exc: CheckpointException) -> str:
    """DCP's per-rank failures, one line each (OSError: [Errno 28] No space left on device: ...)."""
    lines = []
    for rank, (error, _) in sorted(exc.failures.items()):
        text = "".join(traceback.format_exception_only(type(error), error)).strip()
        lines.append(f"  rank {rank}: {text}")
    return "\n".join(lines)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _sync_folder(path: Path) -> None:
    """Make the renames in folder `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path, rank: int = 0, world: int = 1) -> dict[str, dict[str, Any]]:
    """{relative path: {bytes, sha256}} of the files in checkpoint folder `folder` that `rank` wrote (DCP's
    `__R_N.distcp`); rank 0 also takes every other file but the identity (`.metadata`)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        writer = re.match(r"__(\d+)_", name)
        owner = int(writer[1]) if writer and int(writer[1]) < world else 0
        if path.is_file() and name != IDENTITY and owner == rank:
            out[name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return out


def complete(directory: Path) -> list[tuple[int, Path]]:
    """The complete checkpoint folders (`step-N`, not `step-N.tmp`) in `directory`, by step."""
    found = []
    for path in Path(directory).glob("step-*"):
        match = COMPLETE.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune(directory: Path, keep: int, step: int) -> list[Path]:
    """Remove the complete checkpoints up to `step` but the newest `keep` (0: keep all). Later ones, saved
    by a run that went past the checkpoint this one resumed from, stay until a save replaces them."""
    if keep <= 0:
        return []
    old = [path for s, path in complete(directory) if s <= step][:-keep]
    for path in old:
        _remove(path)
    return old


def remove_partial(directory: Path) -> list[Path]:
    """Remove what interrupted saves left in `directory` (`step-N.tmp`, `latest.tmp`); returns the folders."""
    removed = []
    for path in sorted(Path(directory).glob("step-*.tmp")):
        _remove(path)
        removed.append(path)
    pointer = Path(directory) / (LATEST + ".tmp")
    if pointer.is_file():
        pointer.unlink()
    return removed


def latest_name(directory: Path) -> str | None:
    """The checkpoint folder `DIR/latest` names (None when there is no `latest`): the name of a complete
    checkpoint in DIR (`step-NNNNNN`), the only thing lcc writes there. Anything else (a path, `..`) is a
    CheckpointError, so that the pointer never leads out of DIR."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{pointer}: unreadable ({exc})") from None
    if not COMPLETE.fullmatch(name):
        raise CheckpointError(f"{pointer}: names {name!r}, which is not a checkpoint folder of {directory} (lcc "
                              "writes the name of one there, step-NNNNNN)")
    return name


def latest(directory: Path) -> Path | None:
    """The folder `DIR/latest` names, if it is there (see `latest_name`)."""
    name = latest_name(directory)
    path = Path(directory) / name if name is not None else None
    return path if path is not None and path.is_dir() else None


def load(path: Path, state: dict[str, Any]) -> None:
    """Fill `state` (this rank's blocks, keyed as when saved) from a checkpoint of any layout, in place."""
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(path), no_dist=not _distributed())
    except CheckpointException as exc:  # a BaseException: made a RunError for the launcher to report
        raise CheckpointError(f"{path}: loading the checkpoint failed:\n{_failures(exc)}") from None


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """A world of one has no process group: DCP then warns that it assumes one process, which is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


# ------------------------------------------------------------------------------------------ identity
def layout_of(spec: dict[str, Any]) -> dict[str, Any]:
    """The layout a run of the resolved spec (as in a plan's spec.json) is in: its parallelism section,
    the world size and where it ran."""
    par, cluster = spec["parallelism"], spec["cluster"]
    return {**par, "world_size": par["pp"] * par["dp"] * par["tp"], "edp": par["dp"] * par["tp"] // par["ep"],
            "nodes": cluster["nodes"], "gpus_per_node": cluster["gpus_per_node"], "device": cluster["device"]["kind"]}


def identity(spec: dict[str, Any], step: int) -> dict[str, Any]:
    """lcc-checkpoint.json but its `files` (which `save` adds): deterministic (no times, no paths), from the
    plan's spec.json."""
    return {"schema": SCHEMA, "step": step, "spec": spec, "spec_hash": spec_hash(spec), "layout": layout_of(spec),
            "lcc_version": lcc.__version__}


def trained(spec: dict[str, Any]) -> dict[str, Any]:
    """The resolved spec without the fields a resume may change (the layout and operational ones)."""
    def drop(tree: Any, parts: list[str]) -> Any:
        if not isinstance(tree, dict) or parts[0] not in tree:
            return tree
        if len(parts) == 1:
            return {k: v for k, v in tree.items() if k != parts[0]}
        return {**tree, parts[0]: drop(tree[parts[0]], parts[1:])}

    out = {k: v for k, v in spec.items() if k not in LAYOUT_SECTIONS}
    for field in OPERATIONAL:
        out = drop(out, field.split("."))
    return out


def spec_hash(spec: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of `trained(spec)`: equal for every layout of
    the same model and training."""
    text = json.dumps(trained(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def resolve(path: Path) -> Path:
    """A checkpoint folder (`step-NNNNNN`), or a checkpoint directory's latest one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint (a file, not a folder)")
    if not (path / IDENTITY).exists() and (path / LATEST).is_file():
        found = latest(path)
        if found is None:
            raise CheckpointError(f"{path / LATEST}: names {latest_name(path)!r}, which is missing")
        return found
    return path


def read_identity(path: Path) -> dict[str, Any]:
    """The lcc-checkpoint.json of checkpoint folder `path`, checked for its format."""
    file = Path(path) / IDENTITY
    if not file.is_file():
        raise CheckpointError(f"{path}: not an lcc checkpoint ({IDENTITY} is missing)")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: unreadable ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else None
        why = (" (saved by an earlier lcc, without the file checksums a resume checks: resume it with that lcc, or "
               "train again)" if found == "lcc.checkpoint/1" else "")
        raise CheckpointError(f"{file}: checkpoint format {found!r}; this lcc reads {SCHEMA!r}{why}")
    return data


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
            digest = _sha256(path / name)
        except OSError as exc:
            raise CheckpointError(f"{path / name}: unreadable ({exc.strerror})") from None
        if digest != saved["sha256"]:
            raise CheckpointError(f"{path / name}: corrupt: its sha256 differs from the one recorded when it was "
                                  "saved")


def spec_differences(saved: Any, current: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """(field path, saved, current) for every field that differs, outside the layout sections."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if (not path and key in LAYOUT_SECTIONS) or sub in OPERATIONAL:
                continue
            out += spec_differences(saved.get(key, _ABSENT), current.get(key, _ABSENT), sub)
        return out
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [d for i, (a, b) in enumerate(zip(saved, current, strict=True))
                for d in spec_differences(a, b, f"{path}[{i}]")]
    return [] if saved == current else [(path, saved, current)]


class _Absent:
    def __repr__(self) -> str:
        return "absent"


_ABSENT = _Absent()


def _value(v: Any) -> str:
    return "absent" if v is _ABSENT else json.dumps(v)


class SpecMismatch(CheckpointError):
    """A checkpoint of another spec: never skipped for an older one, which would be of that spec too."""


def check_resume(directory: Path, spec: dict[str, Any], fallback: bool = False) -> Path | None:
    """Before any rank starts: the checkpoint a resume from `directory` loads (None if there is none yet);
    see `resume_point`."""
    return resume_point(directory, spec, fallback)[0]


def resume_point(directory: Path, spec: dict[str, Any], fallback: bool = False) -> tuple[Path | None, list[str]]:
    """The checkpoint `latest` names in `directory` (None if there is no `latest`), checked: an lcc checkpoint
    of this spec up to the layout, and every file with the size and sha256 it was saved with. With
    `fallback`, a checkpoint that fails the files' check (or is missing, or unreadable) gives way to the newest
    older complete one that passes; the second value then says what was passed over and why. Raises
    CheckpointError naming the file or every differing field."""
    directory = Path(directory)
    pointer = directory / LATEST
    if not pointer.is_file():
        return None, []
    try:
        name, bad = latest_name(directory), None
    except CheckpointError as exc:  # not a name lcc writes there: every complete checkpoint is older
        name, bad = None, exc
    named = COMPLETE.fullmatch(name) if name is not None else None
    older = [path for s, path in reversed(complete(directory))
             if path.name != name and (named is None or s < int(named[1]))]
    hint = ("\n  (--fallback resumes from the newest older checkpoint that passes this check: "
            f"{older[0].name} is the newest older one)" if older else "")
    passed: list[str] = []
    if bad is not None:
        if not fallback:
            raise CheckpointError(f"{bad}{hint}")
        passed.append(str(bad))
    for path in [*([directory / name] if name is not None else []), *(older if fallback else [])]:
        try:
            if not path.is_dir():
                raise CheckpointError(f"{pointer}: names {name!r}, which is missing")
            _check(path, spec)
        except SpecMismatch:
            raise
        except CheckpointError as exc:
            if not fallback:
                raise CheckpointError(f"{exc}{hint}") from None
            passed.append(str(exc))
            continue
        return path, passed
    raise CheckpointError(f"{directory}: no checkpoint passes its checks:\n" + "\n".join(f"  {p}" for p in passed))


def _check(path: Path, spec: dict[str, Any]) -> None:
    saved = read_identity(path)
    diffs = spec_differences(saved.get("spec", {}), spec)
    if diffs:
        was, now = saved.get("spec", {}).get("name"), spec.get("name")
        of = f"a checkpoint of {was}, not of {now}" if was != now else "a checkpoint of another run"
        lines = [f"  {p}: {_value(a)} in the checkpoint, {_value(b)} in this run" for p, a, b in diffs]
        raise SpecMismatch(f"{path}: cannot resume from {of}: its spec differs in more than the layout "
                           "(parallelism, cluster; train.checkpoint_every and collective_timeout_s may change "
                           "too):\n" + "\n".join(lines))
    if saved.get("spec_hash") != spec_hash(saved.get("spec", {})):
        raise CheckpointError(f"{path / IDENTITY}: its spec_hash does not match its spec (changed after the save)")
    verify(path, saved)


# ------------------------------------------------------------------------------ the launcher's part
@contextlib.contextmanager
def locked(directory: Path) -> Iterator[Path]:
    """Hold checkpoint directory `directory` (created if missing) while the block runs: an flock on
    DIR/.lock, which the system releases when this process ends however it ends; the file names the
    holder. A directory another process holds is refused, naming that process."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise CheckpointError(f"{directory} is in use by {_holder(path)}; one run at a time may use a "
                                  f"checkpoint directory (the lock: {path})") from None
        started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}) + "\n")
                 .encode())
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        data = json.loads(path.read_text())
        return f"pid {data['pid']} (started {data['started']} on {data['host']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (which has not written its pid yet)"


@contextlib.contextmanager
def prepare(directory: Path, spec: dict[str, Any], resume: bool = False, resume_if_any: bool = False,
            fallback: bool = False, keep: int = 3, leader: bool = True) -> Iterator[Resume]:
    """The launcher's part, before any rank starts and for as long as the run lasts: hold the directory's
    lock and remove interrupted saves (`leader`: the launcher, or rank 0 under torchrun), then choose the
    checkpoint to continue from (`resume`: one must exist; `resume_if_any`: start at step 0 when there is
    none; `fallback`: see `resume_point`). Yields what the ranks do (`Resume`); says on stderr what it
    removed or passed over."""
    directory = Path(directory)
    if resume and not directory.is_dir():  # a mistyped directory is not created by the lock
        raise CheckpointError(f"{directory}: no checkpoint to resume from (no such directory); --resume-if-any "
                              "starts at step 0 when there is none")
    with contextlib.ExitStack() as held:
        try:
            if leader:
                held.enter_context(locked(directory))
                for partial in remove_partial(directory):
                    _say(f"removed {partial} (an interrupted save)")
            path = None
            if resume or resume_if_any:
                path, passed = resume_point(directory, spec, fallback)
                if path is None and resume:
                    raise CheckpointError(f"{directory}: no checkpoint to resume from (no {LATEST} file in it); "
                                          "--resume-if-any starts at step 0 when there is none")
                if passed and leader:
                    _say("\n".join(passed) + f"\nresuming from {path} instead (--fallback)")
        except OSError as exc:  # not writable, a full disk, ...
            raise CheckpointError(f"{directory}: cannot use it as the checkpoint directory: {exc}") from None
        yield Resume(str(path) if path is not None else None, keep)


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


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- info
def describe(path: Path) -> dict[str, Any]:
    """What `lcc checkpoint info` shows: the identity, and per key the global shape, dtype, bytes and how
    many chunks it was saved in, from DCP's metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = resolve(path)
    ident = read_identity(path)
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - DCP raises what its reader meets; the user gets one line
        raise CheckpointError(f"{path}: torch.distributed.checkpoint metadata unreadable "
                              f"({type(exc).__name__}: {exc})") from None
    tensors = []
    for key, md in sorted(metadata.state_dict_metadata.items()):
        if isinstance(md, TensorStorageMetadata):
            shape, dtype = list(md.size), md.properties.dtype
            tensors.append({"key": key, "shape": shape, "dtype": str(dtype).removeprefix("torch."),
                            "bytes": math.prod(shape) * dtype.itemsize, "chunks": len(md.chunks)})
        else:
            tensors.append({"key": key, "shape": None, "dtype": "bytes", "bytes": 0, "chunks": 1})
    holds: dict[str, dict[str, int]] = {}
    for t in tensors:
        kind = t["key"].split("/", 1)[0]
        entry = holds.setdefault(kind, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += t["bytes"]
    holds = dict(sorted(holds.items(), key=lambda kv: (KINDS.index(kv[0]) if kv[0] in KINDS else len(KINDS), kv[0])))
    return {"schema": "lcc.checkpoint-info/1", "path": str(path), "step": ident["step"],
            "spec_name": ident["spec"].get("name"), "spec": ident["spec"], "spec_hash": ident.get("spec_hash"),
            "layout": ident["layout"], "lcc_version": ident.get("lcc_version"), "holds": holds, "tensors": tensors}
