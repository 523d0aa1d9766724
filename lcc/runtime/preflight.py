"""What must hold before `lcc run train` starts a rank. A refusal is one message and exit code 2; nothing
has started, nothing is written.

- the number of steps is positive;
- every output path can be written: the metrics file, the transcript, the checkpoint folder (found by
  trying: an existing file is opened for appending, a new one created and removed, a folder gets a probe
  file that is removed at once; permission bits and `os.access` say nothing of a read-only mount or of
  /proc, which the root user sees as writable);
- this machine can hold the plan's ranks: lcc starts one process per rank, each needing about
  `RANK_BASE_BYTES` (the Python interpreter, torch and the runtime; measured 363-379 MiB RSS for
  tiny-moe) plus what the cost model says the rank holds; together they must fit the memory available
  now, and there may be at most `RANKS_PER_CORE` ranks per core (`--force` starts them anyway).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from lcc.plan.types import Plan
from lcc.runtime.support import RunError
from lcc.runtime.threads import usable_cores

GIB = 2**30
RANK_BASE_BYTES = 400 * 2**20
RANKS_PER_CORE = 16  # tiny-moe's 8 ranks on 2 cores train at 2,600-5,000 tokens/s (docs/benchmarks.md)


class LaunchRefused(RunError):
    """A run refused before any rank starts: exit code 2."""

    exit_code = 2


def check_steps(steps: int) -> None:
    if steps < 1:
        raise LaunchRefused(f"--steps {steps}: the number of optimizer steps to run must be at least 1")


def check_outputs(outputs: dict[str, Path | None]) -> None:
    """Every output a run writes (its flag -> its path, None where not given) can be written; the checkpoint
    directory is a folder."""
    for what, path in outputs.items():
        if path is not None:
            check_writable(path, what, folder=what == "--checkpoint-dir")


def check_writable(path: Path, what: str, folder: bool = False) -> None:
    """`path` (a file to write, or with `folder` a folder to write into) can be created or written: tried, not
    inferred from permission bits. Nothing of the user's changes: an existing file is opened for appending
    (never truncated: a resumed run appends to its metrics), a new file or a probe file is removed again."""
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise LaunchRefused(f"{what} {path}: exists and is not a folder")
        if not folder and not path.is_file():
            raise LaunchRefused(f"{what} {path}: exists and is not a regular file")
        _try(what, path, (lambda: _probe_in(path)) if folder else (lambda: _open_to_append(path)))
        return
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LaunchRefused(f"{what} {path}: {parent} is not a folder")
    if folder or parent != path.absolute().parent:  # folders to create: a probe where the first one would go
        _try(what, path, lambda: _probe_in(parent), parent)
    else:
        _try(what, path, lambda: _create_and_remove(path), parent)


def _try(what: str, path: Path, attempt: Callable[[], object], parent: Path | None = None) -> None:
    try:
        attempt()
    except OSError as exc:
        where = f"cannot create it in {parent}" if parent is not None else "cannot write it"
        raise LaunchRefused(f"{what} {path}: {where} ({exc.strerror or exc})") from None


def _probe_in(folder: Path) -> None:
    fd, name = tempfile.mkstemp(prefix=".lcc-write-probe-", dir=folder)
    os.close(fd)
    os.unlink(name)


def _open_to_append(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_APPEND))


def _create_and_remove(path: Path) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:  # created meanwhile by someone else: theirs, left alone
        return
    os.close(fd)
    os.unlink(path)


def available_memory() -> int | None:
    """Bytes of memory available to new processes now (Linux: MemAvailable), or None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def rank_bytes(plan: Plan) -> list[int]:
    """What each rank of a plan will hold in this machine's memory: the base process plus, on CPU plans, the
    cost model's peak for its pipeline rank's role (parameters, gradients, optimizer states, activations at
    the step's fullest moment; a CUDA plan holds them on its GPU)."""
    by_role = {row["role"]: row["peak_bytes"] if plan.device == "cpu" else 0 for row in plan.cost["memory"]["by_role"]}
    pp_of = plan.ranks.columns.index("pp")
    return [RANK_BASE_BYTES + int(by_role.get(f"pp{row[pp_of]}", 0)) for row in plan.ranks.rows]


def check_machine(plan: Plan, force: bool, cores: int | None = None, memory: int | None = None) -> None:
    """This machine can run the plan's ranks as local processes (`force` skips the check)."""
    if force:
        return
    world = plan.world_size
    cores = cores or usable_cores()
    if world > RANKS_PER_CORE * cores:
        raise LaunchRefused(f"the plan has {world} ranks and lcc starts one process per rank here: more than "
                            f"{RANKS_PER_CORE} per core on this machine's {cores} (run it on a cluster with "
                            "torchrun, choose a smaller layout, or pass --force)")
    memory = memory if memory is not None else available_memory()
    need = sum(rank_bytes(plan))
    if memory is not None and need > memory:
        raise LaunchRefused(f"the plan's {world} ranks need about {need / GIB:.1f} GiB here "
                            f"({RANK_BASE_BYTES / GIB:.2f} GiB per process plus what the cost model says each rank "
                            f"holds, {max(rank_bytes(plan)) / GIB:.2f} GiB at most), more than the "
                            f"{memory / GIB:.1f} GiB available on this machine (choose a smaller layout or spec, or "
                            "pass --force)")
