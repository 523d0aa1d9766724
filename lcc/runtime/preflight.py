"""What must hold before `lcc run train` starts a rank. A refusal is one message and exit code 2; nothing
has started, nothing is written.

- the number of steps is positive;
- every output path can be written: the metrics file, the transcript, the checkpoint folder (a path
  whose nearest existing parent is a writable folder, or an existing writable file or folder);
- this machine can hold the plan's ranks: lcc starts one process per rank, each needing about
  `RANK_BASE_BYTES` (the Python interpreter, torch and the runtime; measured 363-379 MiB RSS for
  tiny-moe) plus what the cost model says the rank holds; together they must fit the memory available
  now, and there may be at most `RANKS_PER_CORE` ranks per core (`--force` starts them anyway).
"""

from __future__ import annotations

import os
from pathlib import Path

from lcc.plan.types import Plan
from lcc.runtime.support import RunError

GIB = 2**30
RANK_BASE_BYTES = 400 * 2**20
RANKS_PER_CORE = 16  # tiny-moe's 8 ranks on 2 cores train at 2,600-5,000 tokens/s (docs/benchmarks.md)


class LaunchRefused(RunError):
    """A run refused before any rank starts: exit code 2."""

    exit_code = 2


def check_steps(steps: int) -> None:
    if steps < 1:
        raise LaunchRefused(f"--steps {steps}: the number of optimizer steps to run must be at least 1")


def check_writable(path: Path, what: str, folder: bool = False) -> None:
    """`path` (a file to write, or with `folder` a folder to write into) can be created or written."""
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise LaunchRefused(f"{what} {path}: exists and is not a folder")
        if not folder and not path.is_file():
            raise LaunchRefused(f"{what} {path}: exists and is not a regular file")
        if not os.access(path, os.W_OK | (os.X_OK if folder else 0)):
            raise LaunchRefused(f"{what} {path}: not writable")
        return
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LaunchRefused(f"{what} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LaunchRefused(f"{what} {path}: cannot create it ({parent} is not writable)")


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
    cost model's total for its pipeline rank's role (parameters, gradients, optimizer states, activations;
    a CUDA plan holds them on its GPU)."""
    by_role = {row["role"]: row["total_bytes"] if plan.device == "cpu" else 0 for row in plan.cost["memory"]["by_role"]}
    pp_of = plan.ranks.columns.index("pp")
    return [RANK_BASE_BYTES + int(by_role.get(f"pp{row[pp_of]}", 0)) for row in plan.ranks.rows]


def check_machine(plan: Plan, force: bool, cores: int | None = None, memory: int | None = None) -> None:
    """This machine can run the plan's ranks as local processes (`force` skips the check)."""
    if force:
        return
    world = plan.world_size
    cores = cores or os.cpu_count() or 1
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
