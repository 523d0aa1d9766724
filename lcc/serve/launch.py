"""`lcc run generate`: start a serve plan's ranks on this machine (gloo on loopback), supervised as
training runs are (lcc.runtime.supervise), run the engine on rank 0 over the given prompts, and print
(or write) what it generates."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lcc.backends.cpu import native
from lcc.plan.types import Plan
from lcc.runtime import host_memory
from lcc.runtime.checkpoint_files import CheckpointError
from lcc.runtime.device import join_plan, warn_slow_bfloat16
from lcc.runtime.heartbeat import Heartbeat
from lcc.runtime.launch import check_plan
from lcc.runtime.parent_death import adopt_environment, start_fork_server
from lcc.runtime.preflight import LaunchRefused, check_machine
from lcc.runtime.rank_link import RankLink, SharedFile
from lcc.runtime.rendezvous import host_store
from lcc.runtime.supervise import Run
from lcc.runtime.threads import threads_per_rank
from lcc.serve.engine import RequestError, check_request
from lcc.serve.sampling import SamplingParams
from lcc.serve.weights import check_checkpoint, spec_of


@dataclass
class Job:
    prompts: list[list[int]]  # token ids
    params: SamplingParams
    checkpoint: str | None = None
    stream: bool = True  # print text as it is produced (one prompt) or each completion as it ends
    as_json: bool = False  # print one JSON object per prompt, at the end (the launcher prints them)
    out: str | None = None  # write the results there (JSON: a list of objects)
    max_num_seqs: int | None = None
    max_batched_tokens: int | None = None


def check_serve_plan(plan_dir: Path) -> Plan:
    plan = check_plan(Path(plan_dir), mode="serve")
    if plan.serving is None:
        raise LaunchRefused(f"{plan_dir}: a serve plan without its serving section; compile it again")
    serving = plan.serving
    if serving.native_cpu:
        why = native.unavailable()  # built here once, before any rank starts
        if why is not None:
            raise LaunchRefused(f"{plan_dir}: the plan runs lcc's native CPU kernels, and {why}; compile the plan "
                                "with --set serve.cpu_kernels=torch (PyTorch's kernels)")
    return plan


def generate(plan_dir: Path, job: Job, force: bool = False) -> None:
    """Run `job` on the plan's ranks; RunError (with the failing rank's error) if a rank fails."""
    plan = check_serve_plan(Path(plan_dir))
    vocab = spec_of(plan_dir)["model"]["vocab_size"]
    for i, prompt in enumerate(job.prompts):
        try:
            check_request(plan.serving, vocab, prompt, job.params)
        except RequestError as exc:
            raise LaunchRefused(f"prompt {i + 1}: {exc}") from None
    if job.checkpoint is not None:  # checked here, before any rank starts
        try:  # one folder for every rank (a directory's latest could change while they start), verified once
            folder, _ = check_checkpoint(Path(job.checkpoint), spec_of(plan_dir))
        except CheckpointError as exc:
            raise LaunchRefused(str(exc)) from None
        job = dataclasses.replace(job, checkpoint=str(folder))
    else:
        print(f"warning: no --checkpoint: serving the deterministic initialisation of {plan.spec_name} (random "
              "weights)", file=sys.stderr, flush=True)
    if "RANK" not in os.environ:
        check_machine(plan, force)
        warn_slow_bfloat16(plan)
    temporary = None
    if job.as_json and job.out is None:  # rank 0 writes the results, this process prints them
        handle = tempfile.NamedTemporaryFile(prefix="lcc-generate-", suffix=".json", delete=False)  # noqa: SIM115
        handle.close()
        temporary = Path(handle.name)
        job = dataclasses.replace(job, out=str(temporary))
    try:
        _generate(plan_dir, plan, job)
        if job.as_json:
            for r in json.loads(Path(job.out).read_text()):
                print(json.dumps(r), flush=True)
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)


def _generate(plan_dir: Path, plan: Plan, job: Job) -> None:
    world = plan.world_size
    timeout_s = float(json.loads((Path(plan_dir) / "spec.json").read_text())["train"]["collective_timeout_s"])
    threads = threads_per_rank(world)
    host_memory.choice()
    context = multiprocessing.get_context("forkserver") if world > 1 else None
    run = Run(world, timeout_s, Path(plan_dir), context=context)
    try:
        if world == 1:
            with run.in_process() as link:
                _worker(0, 1, 0, str(plan_dir), job, threads, timeout_s, link)
            return
        start_fork_server(context, ["torch", "lcc.serve.rank"])
        store = host_store(timeout_s)  # the ranks join through it: listening before they start, held until they end
        port, env = store.port, dict(os.environ)
        run.supervise(_worker, lambda rank, link: (rank, world, port, str(plan_dir), job, threads, timeout_s, link,
                                                   env), watchdog_s=math.inf)
    finally:
        run.close()


def _worker(rank: int, world: int, port: int, plan_dir: str, job: Job, threads: int, timeout_s: float,
            link: RankLink, env: dict[str, str] | None = None) -> None:
    if env is not None:
        adopt_environment(env)
    link.attach()
    try:
        _serve_rank(rank, world, port, plan_dir, job, threads, timeout_s, link.heartbeat)
    except Exception as exc:
        if world == 1 or not link.report(rank, exc, (Path(__file__).parents[1], Path(plan_dir))):
            raise
        sys.exit(1)


def _serve_rank(rank: int, world: int, port: int, plan_dir: str, job: Job, threads: int, timeout_s: float,
                beat: Heartbeat) -> None:
    from lcc.serve.engine import Engine, follow
    from lcc.serve.rank import ServeRank

    torch.set_num_threads(threads)
    host_memory.keep_freed_memory()
    beat.beat("joining the process group")
    device = join_plan(plan_dir, rank, world, timeout_s, port)
    try:
        beat.beat("loading weights")
        serve_rank = ServeRank(Path(plan_dir), rank, Path(job.checkpoint) if job.checkpoint else None, verify=False,
                               device=device)
        beat.completed(0)
        if rank != 0:
            follow(serve_rank, beat)
        else:
            engine = Engine(serve_rank, job.max_num_seqs, job.max_batched_tokens, beat)
            try:
                results = run_job(engine, job)
            finally:
                engine.close()
            if job.out:
                Path(job.out).write_text(json.dumps(results, indent=1) + "\n")
        beat.finished()
    finally:
        if world > 1:
            dist.destroy_process_group()


def run_job(engine: Any, job: Job) -> list[dict[str, Any]]:
    """Submit the job's prompts, step until all are done; print as asked; the results in prompt order."""
    ids = [engine.submit(p, job.params) for p in job.prompts]
    index = {rid: i for i, rid in enumerate(ids)}
    tokens: dict[int, list[int]] = {rid: [] for rid in ids}
    texts: dict[int, str] = {rid: "" for rid in ids}
    routed: dict[int, list] = {rid: [] for rid in ids}
    reasons: dict[int, str] = {}
    errors: dict[int, str | None] = {}  # of the requests whose serving failed
    single = len(ids) == 1 and job.stream and not job.as_json
    for u in engine.run():
        if u.finished == "error":
            errors[u.request] = u.error
        tokens[u.request] += u.token_ids
        texts[u.request] += u.text
        routed[u.request] += u.routed_experts or []
        if single and u.text:
            sys.stdout.write(u.text)
            sys.stdout.flush()
        if u.finished:
            reasons[u.request] = u.finished
            if job.stream and not job.as_json and not single:
                print(f"[{index[u.request]}] {texts[u.request]}", flush=True)
    if single:
        print(flush=True)
    failed = next((rid for rid in ids if rid in errors), None)
    if failed is not None:  # the others were served; the run fails, naming the first that was not
        raise RuntimeError(f"prompt {index[failed] + 1} failed: {errors[failed]}")
    extra = (lambda rid: {"routed_experts": routed[rid]}) if job.params.return_routed_experts else (lambda rid: {})
    return [{"token_ids": tokens[rid], "text": texts[rid], "finish_reason": reasons.get(rid), **extra(rid)}
            for rid in ids]


# ------------------------------------------------------------------------------------ lcc run serve
@dataclass
class ServeOptions:
    checkpoint: str | None
    host: str
    port: int
    max_queued: int
    shutdown_timeout: float
    max_num_seqs: int | None = None
    max_batched_tokens: int | None = None
    api_key: str | None = None  # /v1/ routes need `Authorization: Bearer <api_key>`


def serve(plan_dir: Path, opts: ServeOptions, force: bool = False) -> None:
    """Serve the plan over HTTP until SIGTERM or SIGINT (then drain) or a rank fails (RunError)."""
    plan = check_serve_plan(Path(plan_dir))
    if opts.checkpoint is not None:
        try:
            folder, _ = check_checkpoint(Path(opts.checkpoint), spec_of(plan_dir))
        except CheckpointError as exc:
            raise LaunchRefused(str(exc)) from None
        opts = dataclasses.replace(opts, checkpoint=str(folder))
    else:
        print(f"warning: no --checkpoint: serving the deterministic initialisation of {plan.spec_name} (random "
              "weights)", file=sys.stderr, flush=True)
    _check_port(opts.host, opts.port)
    if "RANK" not in os.environ:
        check_machine(plan, force)
        warn_slow_bfloat16(plan)
    world = plan.world_size
    timeout_s = float(json.loads((Path(plan_dir) / "spec.json").read_text())["train"]["collective_timeout_s"])
    threads = threads_per_rank(world)
    host_memory.choice()
    context = multiprocessing.get_context("forkserver")  # rank 0 too: it takes SIGTERM from the launcher
    run = Run(world, timeout_s, Path(plan_dir), context=context)
    logs = rank_logs(run, plan.spec_name)
    kernels = f"lcc's native CPU kernels, {native.load().isa} build; " if plan.serving.native_cpu else ""
    print(f"lcc run serve: loading {plan.spec_name} on {world} rank{'s' if world != 1 else ''} ({kernels}their "
          f"stderr: {logs}/rank<N>.log) ...", file=sys.stderr, flush=True)
    try:
        start_fork_server(context, ["torch", "lcc.serve.rank", "lcc.serve.server"])
        store = host_store(timeout_s)  # the ranks join through it: listening before they start, held until they end
        port, env = store.port, dict(os.environ)
        run.supervise(_server_worker, lambda rank, link: (rank, world, port, str(plan_dir), opts, threads, timeout_s,
                                                          link, env), watchdog_s=math.inf,
                      drain_s=opts.shutdown_timeout)
        _remove_if_empty(logs)
    finally:
        run.close()


class RankLog(SharedFile):
    """A rank's stderr, written to a file of the server's log folder as it comes (a server may run for
    weeks: nothing of it is held in memory). What the launcher reads of it, for a failure's report or at
    the end, is the last `tail` bytes."""

    def __init__(self, path: Path, tail: int = 16 * 2**10):
        super().__init__(os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644))
        self.path, self.tail = path, tail

    def read(self) -> bytes:
        size = os.fstat(self.fd).st_size
        start = max(0, size - self.tail)
        data = os.pread(self.fd, size - start, start) if size else b""
        if start:
            data = data[data.find(b"\n") + 1:]  # from the first whole line
            data = f"[the last lines of {self.path}]\n".encode() + data
        return data


def rank_logs(run: Run, name: str) -> Path:
    """A new folder for the ranks' stderr (rank<N>.log), each rank's in place of the unnamed file the run
    would hold it in."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    folder = Path(tempfile.mkdtemp(prefix=f"lcc-serve-{name}-{stamp}-"))
    for rank, link in enumerate(run.links):
        if link.stderr is not None:
            link.stderr.close()
            link.stderr = RankLog(folder / f"rank{rank}.log")
    return folder


def _remove_if_empty(folder: Path) -> None:
    """After a clean stop: the logs the ranks wrote nothing into go, and the folder if they all did."""
    for log in folder.glob("rank*.log"):
        if log.stat().st_size == 0:
            log.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise LaunchRefused(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _server_worker(rank: int, world: int, port: int, plan_dir: str, opts: ServeOptions, threads: int,
                   timeout_s: float, link: RankLink, env: dict[str, str]) -> None:
    adopt_environment(env)
    terminal = os.dup(2) if rank == 0 else None  # where the launcher's stderr goes: attach sends ours to the log
    link.attach()
    try:
        _server_rank(rank, world, port, plan_dir, opts, threads, timeout_s, link.heartbeat, terminal)
    except Exception as exc:
        if not link.report(rank, exc, (Path(__file__).parents[1], Path(plan_dir))):
            raise
        sys.exit(1)


def _server_rank(rank: int, world: int, port: int, plan_dir: str, opts: ServeOptions, threads: int,
                 timeout_s: float, beat: Heartbeat, terminal: int | None = None) -> None:
    from lcc.serve.engine import Engine, follow
    from lcc.serve.loop import EngineLoop
    from lcc.serve.rank import ServeRank
    from lcc.serve.served import ServedModel
    from lcc.serve.server import Metrics, listen, run_server

    torch.set_num_threads(threads)
    host_memory.keep_freed_memory()
    beat.beat("joining the process group")
    device = join_plan(plan_dir, rank, world, timeout_s, port)
    checkpoint = Path(opts.checkpoint) if opts.checkpoint else None
    try:
        if rank != 0:
            beat.beat("loading weights")
            follow(ServeRank(Path(plan_dir), rank, checkpoint, verify=False, device=device), beat)
            beat.finished()
            return
        plan = check_serve_plan(Path(plan_dir))

        def start() -> Engine:
            return Engine(ServeRank(Path(plan_dir), 0, checkpoint, verify=False, device=device), opts.max_num_seqs,
                          opts.max_batched_tokens, beat)

        # SIGTERM and SIGINT: uvicorn's while it serves (drain, then stop); ignored after, when uvicorn hands the
        # signal it took back to the process (the launcher waits for this rank to end the run)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        metrics = Metrics()
        loop = EngineLoop(start, keep_alive_s=max(0.5, timeout_s / 4), metrics=metrics)
        sock = listen(opts.host, opts.port)  # port 0: the system's choice, which the ready line names
        loop.begin()
        try:
            run_server(loop, metrics, plan.serving, ServedModel.of_plan(Path(plan_dir), plan.spec_name), sock,
                       opts.max_queued, opts.shutdown_timeout, _teller(terminal), api_key=opts.api_key)
        finally:
            loop.stop()  # (done already but where run_server failed) aborts what is left, releases the other ranks
        if loop.failure is not None:
            raise loop.failure
        beat.finished()
    finally:
        if world > 1:
            dist.destroy_process_group()


def _teller(fd: int | None) -> Callable[[str], None]:
    """Progress lines of `lcc run serve`, on the launcher's stderr (`fd`: a copy of it)."""
    out = os.fdopen(fd, "w", buffering=1) if fd is not None else sys.stderr

    def say(text: str) -> None:
        print(f"lcc run serve: {text}", file=out, flush=True)

    return say
