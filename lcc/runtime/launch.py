"""Start the ranks of a plan on this machine (gloo on loopback), supervise them, and collect metrics. The
ranks join through a store the launcher listens on before it starts them (lcc.runtime.rendezvous).

Ranks are supervised (lcc.runtime.supervise): none outlives the launcher; the first rank that fails on its
own, dies, or makes no progress for `train.collective_timeout_s` while its peers wait ends the run, named
with its own error (every traceback goes to a log); a watchdog bounds the whole run; SIGINT and SIGTERM
stop every rank and say at which step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lcc.data.stream import DataError, check_corpus
from lcc.data.tokenizer import TokenizerError, plan_tokenizer
from lcc.plan import PlanFormatError, read_plan
from lcc.plan.program_check import ProgramMismatch, check_programs
from lcc.plan.types import Plan
from lcc.runtime import host_memory
from lcc.runtime.checkpoint_files import CheckpointError
from lcc.runtime.checkpoint_identity import read_identity
from lcc.runtime.checkpoint_resume import Resume, prepare
from lcc.runtime.checkpoint_verify import check_checkpoint
from lcc.runtime.compiled import CompileUnavailable, check_compile
from lcc.runtime.device import check_device, join_plan, warn_slow_bfloat16
from lcc.runtime.evaluate import validation_loss
from lcc.runtime.heartbeat import Beats, Heartbeat, watch_engine
from lcc.runtime.parent_death import adopt_environment, start_fork_server
from lcc.runtime.preflight import LaunchRefused, check_machine, check_outputs, check_steps
from lcc.runtime.progress import StepProgress
from lcc.runtime.rank_link import RankLink
from lcc.runtime.rendezvous import check_torchrun, host_store, rank_outputs, torchrun_rank
from lcc.runtime.supervise import Run
from lcc.runtime.support import RunError
from lcc.runtime.tensorboard import Board, available
from lcc.runtime.threads import threads_per_rank
from lcc.runtime.trace import merge as merge_trace
from lcc.runtime.transcript import merge, part_path
from lcc.spec.models import Spec


@dataclass(frozen=True)
class RankJob:
    """What every rank of a training run is handed, as the launcher decided it before starting them (one value,
    pickled into each rank's process): the plan and its steps, where the rank joins its peers (`port` on
    loopback; `init` False under torchrun, which has already placed it), its outputs and its checkpoint
    directory, and (`env`, a rank forked from the fork server) the launcher's environment to adopt."""

    world: int
    port: int
    plan_dir: str
    steps: int
    metrics: str | None
    threads: int
    timeout_s: float
    quiet: bool
    checkpoints: str | None = None
    resume: Resume | None = None
    init: bool = True
    track_memory: bool = False
    env: dict[str, str] | None = None
    transcript: str | None = None
    spec_dir: str | None = None
    trace: str | None = None
    tensorboard: str | None = None


def _worker(job: RankJob, rank: int, link: RankLink | None = None) -> None:
    if job.env is not None:  # forked from the server
        adopt_environment(job.env)
    if link is not None:  # in a process of its own: dies with the launcher, stderr to the launcher's log
        link.attach()
    try:
        _run_rank(job, rank, link.heartbeat if link is not None else None)
    except Exception as exc:
        if link is None or not link.report(rank, exc, (Path(__file__).parents[1], Path(job.plan_dir))):
            raise
        sys.exit(1)  # the launcher has the error and its traceback


def _run_rank(job: RankJob, rank: int, heartbeat: Heartbeat | None = None) -> None:
    from lcc.runtime.engine import RankEngine

    beat = heartbeat if heartbeat is not None else Beats(1).rank(0)  # the launcher watches it
    world, plan_dir, steps, metrics, checkpoints, resume = (job.world, job.plan_dir, job.steps, job.metrics,
                                                             job.checkpoints, job.resume)
    torch.set_num_threads(job.threads)
    host_memory.keep_freed_memory()
    beat.beat("joining the process group")
    port = job.port if job.init else None  # init: through the launcher's store
    device = join_plan(plan_dir, rank, world, job.timeout_s, port)
    try:
        beat.beat("building the rank's engine")
        dump = os.environ.get("LCC_DUMP_GRADS")  # tests: save step-1 gradients of every rank here
        engine = RankEngine(Path(plan_dir), rank, spec_dir=Path(job.spec_dir) if job.spec_dir else None, device=device,
                            keep_grads=bool(dump), track_memory=job.track_memory,
                            transcript=part_path(Path(job.transcript), rank) if job.transcript else None,
                            trace=part_path(Path(job.trace), rank) if job.trace else None)
        watch_engine(engine, beat)
        beat.beat("resuming")
        first = engine.resume(Path(resume.path)) if resume and resume.path else 0
        if resume and resume.init_from and not resume.path:
            beat.beat("loading the initial weights")
            engine.load_weights(Path(resume.init_from))
        good = resume.path if resume else None  # the last checkpoint of finite loss
        saved = None  # the last checkpoint this run wrote
        every = engine.spec.train.checkpoint_every
        mode = "a" if first else "w"
        if metrics and rank == 0:
            Path(metrics).parent.mkdir(parents=True, exist_ok=True)
        out = open(metrics, mode) if metrics and rank == 0 else None  # noqa: SIM115 - closed below
        board = Board(Path(job.tensorboard)) if job.tensorboard and rank == 0 else None
        progress = StepProgress(first, steps, enabled=rank == 0 and not job.quiet)
        beat.completed(first)
        try:
            for step in range(first, steps):
                start = time.perf_counter()
                beat.step(step)
                record = engine.train_step(step)
                record["step"] = step + 1  # optimizer steps completed, as the console and checkpoint names count
                beat.completed(step + 1)
                if dump and step == 0:
                    torch.save(engine.last_grads, Path(dump) / f"grads_rank{rank}.pt")
                record["seconds"] = time.perf_counter() - start
                record["tokens_per_second"] = record["tokens"] / record["seconds"]
                check = engine.plan.data.validation  # train.eval_every: every rank, after the same steps
                if check is not None and (step + 1) % check.every == 0 and math.isfinite(record["loss"]):
                    beat.beat(f"evaluating on the validation split after step {step + 1}")
                    record.update(validation_loss(engine))
                if rank == 0:
                    if out is not None:
                        out.write(json.dumps(record, sort_keys=True) + "\n")
                        out.flush()
                    if board is not None:
                        board.add(record)
                    progress.update(record)
                done = step + 1
                if not math.isfinite(record["loss"]):  # reduced over the world: every rank stops here
                    if world > 1:  # once rank 0 has written the step's record: the first failure ends the run
                        dist.barrier()
                    raise RunError(f"loss is {record['loss']} at step {done}; last good checkpoint: {good or 'none'}")
                if checkpoints and (done == steps or (every and done % every == 0)):
                    beat.beat(f"saving the checkpoint of step {done}")
                    good = saved = str(engine.save(Path(checkpoints), done, resume.keep if resume else 0))
            beat.finished()
            progress.summary(saved)
        finally:
            progress.close()
            if out is not None:
                out.close()
            if board is not None:
                board.close()
            if engine.transcript is not None:
                engine.transcript.write()
            if engine.trace is not None:
                engine.trace.write()
    finally:
        if world > 1:
            dist.destroy_process_group()


def check_plan(plan_dir: Path, mode: str = "train") -> Plan:
    """What must hold before any rank starts: a plan folder of this lcc's version, programs that issue
    exactly the collectives the plan lists, a plan of `mode` (train or serve), and the devices the plan
    runs on (lcc.runtime.device.check_device) with a C++ compiler where the plan compiles on CPU
    (LaunchRefused, exit code 2, otherwise)."""
    plan_dir = Path(plan_dir)
    if not plan_dir.is_dir():
        raise LaunchRefused(f"{plan_dir}: not a folder (a compiled plan folder, or a spec file)")
    for name in ("plan.json", "spec.json"):
        if not (plan_dir / name).is_file():
            raise LaunchRefused(f"{plan_dir / name}: missing (not a compiled plan folder: lcc compile writes one)")
    try:
        plan = read_plan(plan_dir)
        programs = {}
        for role in plan.roles:
            path = plan_dir / role.program
            if not path.is_file():
                raise LaunchRefused(f"{path}: missing (the plan's role {role.name} has no program)")
            programs[role.program] = path.read_text()
        check_programs(plan, programs)
    except (PlanFormatError, ProgramMismatch) as exc:
        raise LaunchRefused(str(exc)) from None
    if plan.mode != mode:
        runs = "lcc run train executes train plans" if mode == "train" else \
            "lcc run generate executes serve plans (lcc compile --mode serve)"
        raise LaunchRefused(f"{plan_dir}: a {plan.mode} plan; {runs}")
    check_device(plan)
    try:
        check_compile(plan.roles, plan.device)
    except CompileUnavailable as exc:
        raise LaunchRefused(f"{plan_dir}: {exc}") from None
    return plan


def preflight(plan: Plan, steps: int, outputs: dict[str, Path | None], force: bool) -> None:
    """Before any rank starts (LaunchRefused, exit code 2): positive steps, writable outputs, and a machine
    that can hold the plan's ranks (lcc.runtime.preflight); under torchrun, where this process is one rank:
    the outputs this rank writes, and torchrun's placement of the ranks is the plan's
    (lcc.runtime.rendezvous.check_torchrun)."""
    check_steps(steps)
    check_outputs(rank_outputs(outputs))
    if torchrun_rank() is None:
        check_machine(plan, force)
        warn_slow_bfloat16(plan)
    else:  # the ranks are already placed: as the plan places them
        check_torchrun(plan)


def launch(plan_dir: Path, steps: int, metrics: Path | None = None, quiet: bool = False,
           checkpoints: Path | None = None, resume: bool = False, track_memory: bool = False,
           transcript: Path | None = None, spec_dir: Path | None = None, resume_if_any: bool = False,
           fallback: bool = False, keep: int = 3, force: bool = False, init_from: Path | None = None,
           trace: Path | None = None, tensorboard: Path | None = None) -> None:
    """Run `steps` optimizer steps of a compiled plan. `track_memory`: on CPU, count the bytes of live
    tensors for the metrics' peak memory (exact, but slows each step; otherwise the peak resident size).
    `transcript`: write every collective each rank issues there (JSON lines). `spec_dir`: where a
    relative `train.data.path` is read from. `checkpoints`: the checkpoint directory, locked for the run;
    `keep` the newest checkpoints in it (0: all). `resume`: continue from its latest checkpoint, saved under
    any layout of the same spec (an error if there is none); `resume_if_any`: the same, or start at step 0
    if there is none yet; `fallback`: resume from the newest older checkpoint if the latest fails its checks
    (all checked here, before any rank starts: checkpoint_resume.prepare). `force`: start the ranks even where
    this machine looks too small for them (lcc.runtime.preflight). `init_from`: a checkpoint (any layout, the
    same model and routing) whose weights a run that starts at step 0 begins from, checked here. `trace`: write
    a Perfetto trace of what each rank did and when there (lcc.runtime.trace). `tensorboard`: rank 0 writes
    each step's figures there as TensorBoard scalars (lcc.runtime.tensorboard)."""
    plan = check_plan(Path(plan_dir))
    if tensorboard is not None and available() is not None:
        raise LaunchRefused(available())
    preflight(plan, steps, {"--metrics": metrics, "--transcript": transcript, "--trace": trace,
                            "--checkpoint-dir": checkpoints}, force)
    spec = json.loads((Path(plan_dir) / "spec.json").read_text())
    check_plan_data(Path(plan_dir), spec, spec_dir)
    if (resume or resume_if_any or fallback) and checkpoints is None:
        raise LaunchRefused("resuming needs a checkpoint directory (--checkpoint-dir)")
    world = plan.world_size
    leader = torchrun_rank() in (None, 0)  # the launcher, or rank 0 under torchrun
    with contextlib.ExitStack() as held:
        start = None
        with _refused_on_checkpoint_error():
            if checkpoints is not None:  # held for the whole run; under torchrun rank 0 locks
                start = held.enter_context(prepare(Path(checkpoints), spec, resume, resume_if_any, fallback, keep,
                                                   leader))
            taken = read_identity(Path(start.path))["step"] if start is not None and start.path else 0
            if init_from is not None:
                start = _initial_weights(Path(init_from), spec, start, leader and not quiet)
        if taken and leader and not quiet:
            print(f"resuming from step {taken} ({start.path})", flush=True)
        if taken >= steps:
            if leader:
                print(f"nothing to run: {start.path} has taken {taken} step{'s' * (taken != 1)}, and --steps is "
                      f"{steps}", flush=True)
            return
        try:
            _launch(plan_dir, world, steps, metrics, quiet, checkpoints, start, track_memory, transcript, spec_dir,
                    spec, trace, tensorboard)
        finally:
            if transcript is not None and torchrun_rank() is None:  # under torchrun each rank keeps its part
                merge(Path(transcript), world)
            if trace is not None and torchrun_rank() is None:
                merge_trace(Path(trace), world)


def check_plan_data(plan_dir: Path, spec: dict[str, Any], spec_dir: Path | None) -> None:
    """The plan's corpus can be read and holds one training sequence (lcc.data.stream.check_corpus), read
    as the ranks will read it: from `spec_dir` for a relative path, through the plan's tokenizer."""
    try:
        check_corpus(Spec.model_validate(spec), spec_dir, plan_tokenizer(plan_dir))
    except (DataError, TokenizerError) as exc:
        raise LaunchRefused(str(exc)) from None


@contextlib.contextmanager
def _refused_on_checkpoint_error() -> Iterator[None]:
    """A checkpoint directory or --init-from checkpoint that cannot be used, found before any rank starts, is
    a refusal (exit code 2) like any other."""
    try:
        yield
    except CheckpointError as exc:
        raise LaunchRefused(str(exc)) from None


def _initial_weights(path: Path, spec: dict[str, Any], start: Resume | None, say: bool) -> Resume:
    """`start` with the checkpoint folder of --init-from, checked (complete, and of the same model and
    routing), unless the run resumes from a checkpoint of its own."""
    folder, _ = check_checkpoint(path, spec)
    start = start if start is not None else Resume()
    if start.path:
        if say:
            print(f"--init-from {path}: not used, the run resumes from {start.path}", flush=True)
        return start
    return dataclasses.replace(start, init_from=str(folder))


def _launch(plan_dir: Path, world: int, steps: int, metrics: Path | None, quiet: bool, checkpoints: Path | None,
            resume: Resume | None, track_memory: bool, transcript: Path | None, spec_dir: Path | None,
            spec: dict[str, Any], trace: Path | None = None, tensorboard: Path | None = None) -> None:
    extra = (str(transcript) if transcript else None, str(spec_dir) if spec_dir else None,
             str(trace) if trace else None, str(tensorboard) if tensorboard else None)
    if torchrun_rank() is not None:  # started by torchrun: this process is one rank (placement checked)
        _torchrun_worker(plan_dir, steps, metrics, quiet, float(spec["train"]["collective_timeout_s"]), checkpoints,
                         resume, track_memory, extra)
        return
    timeout_s = float(spec["train"]["collective_timeout_s"])
    threads = threads_per_rank(world)
    host_memory.choice()
    context = multiprocessing.get_context("forkserver") if world > 1 else None
    run = Run(world, timeout_s, Path(plan_dir), metrics, checkpoints, context)
    try:
        if world == 1:
            with run.in_process() as link:
                _worker(RankJob(world, 0, str(plan_dir), steps, str(metrics) if metrics else None, threads, timeout_s,
                                quiet, str(checkpoints) if checkpoints else None, resume, track_memory=track_memory,
                                transcript=extra[0], spec_dir=extra[1], trace=extra[2], tensorboard=extra[3]), 0,
                        link)
            return
        # ranks fork from a server process that has imported torch and the runtime once (per parent process):
        # starting 8 ranks then costs a fork each instead of 8 fresh interpreters importing torch
        # torch.optim imports torch._dynamo when an optimizer is built: 1.5-2 s a rank, once in the fork server
        start_fork_server(context, ["torch", "torch._dynamo", "lcc.runtime.engine"])
        store = host_store(timeout_s)  # listening before any rank starts, held until they end
        job = RankJob(world, store.port, str(plan_dir), steps, str(metrics) if metrics else None, threads, timeout_s,
                      quiet, str(checkpoints) if checkpoints else None, resume, True, track_memory, dict(os.environ),
                      *extra)

        def args(rank: int, link: RankLink) -> tuple[Any, ...]:
            return (job, rank, link)

        run.supervise(_worker, args, watchdog_s=timeout_s * (steps + 2))
    finally:
        run.close()


def _torchrun_worker(plan_dir: Path, steps: int, metrics: Path | None, quiet: bool, timeout_s: float,
                     checkpoints: Path | None, resume: Resume | None, track_memory: bool,
                     extra: tuple[str | None, str | None, str | None]) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    threads = threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    host_memory.choice()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    _worker(RankJob(world, int(os.environ["MASTER_PORT"]), str(plan_dir), steps, str(metrics) if metrics else None,
                    threads, timeout_s, quiet, str(checkpoints) if checkpoints else None, resume, init=False,
                    track_memory=track_memory, transcript=extra[0], spec_dir=extra[1], trace=extra[2],
                    tensorboard=extra[3]), rank)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
