"""Start the ranks of a plan on this machine (gloo on loopback), supervise them, and collect metrics.

A rank that raises or dies ends the whole run with that rank's error; a rank stuck in a collective
gives up after `train.collective_timeout_s` (the process group's timeout), and a watchdog bounds the
whole run. Ctrl-C stops every rank.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import shutil
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lcc.plan import PlanFormatError, read_plan
from lcc.plan.program_check import ProgramMismatch, check_programs
from lcc.plan.types import Plan
from lcc.runtime.checkpoint import check_resume
from lcc.runtime.progress import StepProgress
from lcc.runtime.support import RunError
from lcc.runtime.transcript import merge, part_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _secondary(exc: BaseException) -> bool:
    """A rank that fails only because a peer went away: not the error to show."""
    text = str(exc)
    return isinstance(exc, dist.DistError) or any(s in text for s in ("Connection closed by peer",
                                                                      "Connection reset", "Broken pipe"))


def _worker(rank: int, world: int, port: int, plan_dir: str, steps: int, metrics: str | None, threads: int,
            timeout_s: float, quiet: bool, checkpoints: str | None = None, resume: bool = False,
            init: bool = True, errors: str | None = None, track_memory: bool = False,
            env: dict[str, str] | None = None, transcript: str | None = None, spec_dir: str | None = None) -> None:
    if env is not None:  # forked from the server: take the launching process's environment of now
        os.environ.update(env)
    try:
        _run_rank(rank, world, port, plan_dir, steps, metrics, threads, timeout_s, quiet, checkpoints, resume, init,
                  track_memory, transcript, spec_dir)
    except Exception as exc:
        if errors:
            record = {"rank": rank, "secondary": _secondary(exc), "error": traceback.format_exc()}
            Path(errors, f"rank{rank}.json").write_text(json.dumps(record))
            if record["secondary"]:
                time.sleep(5)  # let the rank that caused it be the one reported
        raise


def _run_rank(rank: int, world: int, port: int, plan_dir: str, steps: int, metrics: str | None, threads: int,
              timeout_s: float, quiet: bool, checkpoints: str | None, resume: bool, init: bool,
              track_memory: bool, transcript: str | None, spec_dir: str | None) -> None:
    from lcc.runtime.engine import RankEngine

    torch.set_num_threads(threads)
    if init:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        dump = os.environ.get("LCC_DUMP_GRADS")  # tests: save step-1 gradients of every rank here
        engine = RankEngine(Path(plan_dir), rank, spec_dir=Path(spec_dir) if spec_dir else None,
                            keep_grads=bool(dump), track_memory=track_memory,
                            transcript=part_path(Path(transcript), rank) if transcript else None)
        first = engine.resume(Path(checkpoints)) if resume and checkpoints else 0
        every = engine.spec.train.checkpoint_every
        mode = "a" if first else "w"
        if metrics and rank == 0:
            Path(metrics).parent.mkdir(parents=True, exist_ok=True)
        out = open(metrics, mode) if metrics and rank == 0 else None  # noqa: SIM115 - closed below
        progress = StepProgress(first, steps, enabled=rank == 0 and not quiet)
        try:
            for step in range(first, steps):
                start = time.perf_counter()
                record = engine.train_step(step)
                if dump and step == 0:
                    torch.save(engine.last_grads, Path(dump) / f"grads_rank{rank}.pt")
                record["seconds"] = time.perf_counter() - start
                record["tokens_per_second"] = record["tokens"] / record["seconds"]
                if rank == 0:
                    if out is not None:
                        out.write(json.dumps(record, sort_keys=True) + "\n")
                        out.flush()
                    progress.update(record)
                done = step + 1
                if checkpoints and (done == steps or (every and done % every == 0)):
                    engine.save(Path(checkpoints), done)
        finally:
            progress.close()
            if out is not None:
                out.close()
            if engine.transcript is not None:
                engine.transcript.write()
    finally:
        if world > 1:
            dist.destroy_process_group()


def check_plan(plan_dir: Path) -> Plan:
    """What must hold before any rank starts: a plan of this lcc's version, programs that issue exactly
    the collectives the plan lists, and a device this runtime drives."""
    if not (Path(plan_dir) / "spec.json").is_file():
        raise RunError(f"{Path(plan_dir) / 'spec.json'}: missing (not a compiled plan folder)")
    try:
        plan = read_plan(Path(plan_dir))
        programs = {}
        for role in plan.roles:
            path = Path(plan_dir) / role.program
            if not path.is_file():
                raise RunError(f"{path}: missing (the plan's role {role.name} has no program)")
            programs[role.program] = path.read_text()
        check_programs(plan, programs)
    except (PlanFormatError, ProgramMismatch) as exc:
        raise RunError(str(exc)) from None
    if plan.device != "cpu":
        raise RunError(f"{plan_dir}: a {plan.device} plan (cluster.device.kind); this runtime executes CPU plans on "
                       "gloo ranks only: the CUDA/NCCL path is not built yet")
    if plan.mode != "train":
        raise RunError(f"{plan_dir}: a {plan.mode} plan; lcc run train executes train plans")
    return plan


def launch(plan_dir: Path, steps: int, metrics: Path | None = None, quiet: bool = False,
           checkpoints: Path | None = None, resume: bool = False, track_memory: bool = False,
           transcript: Path | None = None, spec_dir: Path | None = None) -> None:
    """Run `steps` optimizer steps of a compiled plan. `track_memory`: on CPU, count the bytes of live
    tensors for the metrics' peak memory (exact, but slows each step; otherwise the peak resident size).
    `transcript`: write every collective each rank issues there (JSON lines). `spec_dir`: where a
    relative `train.data.path` is read from. `resume`: continue from the latest checkpoint in
    `checkpoints`, saved under any layout of the same spec (checked here, before any rank starts)."""
    plan = check_plan(Path(plan_dir))
    spec = json.loads((Path(plan_dir) / "spec.json").read_text())
    if resume and checkpoints is not None:  # the same spec up to the layout, before any rank starts
        check_resume(Path(checkpoints), spec)
    world = plan.world_size
    try:
        _launch(plan_dir, world, steps, metrics, quiet, checkpoints, resume, track_memory, transcript, spec_dir, spec)
    finally:
        if transcript is not None and "RANK" not in os.environ:  # under torchrun each rank keeps its part
            merge(Path(transcript), world)


def _launch(plan_dir: Path, world: int, steps: int, metrics: Path | None, quiet: bool, checkpoints: Path | None,
            resume: bool, track_memory: bool, transcript: Path | None, spec_dir: Path | None,
            spec: dict[str, Any]) -> None:
    extra = (str(transcript) if transcript else None, str(spec_dir) if spec_dir else None)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun: this process is one rank
        if int(os.environ["WORLD_SIZE"]) != world:
            raise RunError(f"torchrun started {os.environ['WORLD_SIZE']} ranks; the plan needs {world}")
        _torchrun_worker(plan_dir, steps, metrics, quiet, float(spec["train"]["collective_timeout_s"]), checkpoints,
                         resume, track_memory, extra)
        return
    timeout_s = float(spec["train"]["collective_timeout_s"])
    threads = max(1, (os.cpu_count() or 1) // world)
    if world == 1:
        _worker(0, world, 0, str(plan_dir), steps, str(metrics) if metrics else None, threads, timeout_s, quiet,
                str(checkpoints) if checkpoints else None, resume, track_memory=track_memory, transcript=extra[0],
                spec_dir=extra[1])
        return
    errors = tempfile.mkdtemp(prefix="lcc-errors-")
    args = (world, _free_port(), str(plan_dir), steps, str(metrics) if metrics else None, threads, timeout_s, quiet,
            str(checkpoints) if checkpoints else None, resume, True, errors, track_memory, dict(os.environ), *extra)
    # ranks fork from a server process that has imported torch and the runtime once (per parent process):
    # starting 8 ranks then costs a fork each instead of 8 fresh interpreters importing torch
    multiprocessing.set_forkserver_preload(["torch", "lcc.runtime.engine"])
    context = mp.start_processes(_worker, args=args, nprocs=world, join=False, start_method="forkserver")
    start = time.monotonic()
    watchdog = timeout_s * (steps + 2)
    try:
        while not context.join(timeout=1):
            if time.monotonic() - start > watchdog:
                raise RunError(f"the run did not finish within its watchdog time ({watchdog:.0f} s)")
    except mp.ProcessRaisedException as exc:
        raise RunError(_first_error(errors) or f"rank {exc.error_index} failed:\n{exc}") from None
    except mp.ProcessExitedException as exc:
        raise RunError(f"rank {exc.error_index} exited with code {exc.exit_code} ({exc})") from None
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
        shutil.rmtree(errors, ignore_errors=True)


def _torchrun_worker(plan_dir: Path, steps: int, metrics: Path | None, quiet: bool, timeout_s: float,
                     checkpoints: Path | None, resume: bool, track_memory: bool,
                     extra: tuple[str | None, str | None]) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    _worker(rank, world, int(os.environ["MASTER_PORT"]), str(plan_dir), steps, str(metrics) if metrics else None,
            threads, timeout_s, quiet, str(checkpoints) if checkpoints else None, resume, init=False,
            track_memory=track_memory, transcript=extra[0], spec_dir=extra[1])


def _first_error(errors: str) -> str | None:
    """The error of the lowest rank that failed on its own (not because a peer went away)."""
    records = [json.loads(p.read_text()) for p in sorted(Path(errors).glob("rank*.json"))]
    primary = sorted((r for r in records if not r["secondary"]), key=lambda r: r["rank"])
    chosen = primary or sorted(records, key=lambda r: r["rank"])
    if not chosen:
        return None
    return f"rank {chosen[0]['rank']} failed:\n{chosen[0]['error']}"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
