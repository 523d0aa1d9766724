"""A failing, killed, hung or stopped run ends with a clear message, within the timeout; never a hang, and
no process of it outlives its launcher."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lcc.compiler.output import write
from lcc.compiler.plan import compile_plan
from lcc.runtime.checkpoint_dir import latest
from lcc.runtime.launch import launch
from lcc.runtime.rank_failures import failure_record, failure_text
from lcc.runtime.support import RunError
from lcc.spec import load_spec
from tests.conftest import ROOT, SPECS

TIMEOUT_S = 3  # train.collective_timeout_s of these runs
LAYOUT = ["parallelism.pp=2", "parallelism.dp=1", "parallelism.ep=1", "cluster.gpus_per_node=2", "model.n_layers=2",
          "train.seq_len=16", "train.global_batch=8", f"train.collective_timeout_s={TIMEOUT_S}"]


def plan(tmp_path: Path, *extra: str) -> Path:
    out = tmp_path / "plan"
    write(compile_plan(load_spec(SPECS / "tiny-moe.yaml", [*LAYOUT, *extra])), out)
    return out


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_rank_that_raises_ends_the_run(tmp_path):
    folder = plan(tmp_path)
    program = folder / "programs" / "stage1.py"
    broken = program.read_text().replace('    """P: this', '    raise RuntimeError("boom in stage 1")\n    """P: this')
    program.write_text(broken)
    start = time.monotonic()
    with pytest.raises(RunError) as err:
        launch(folder, 3, tmp_path / "metrics.jsonl", quiet=True)
    text = str(err.value)
    assert time.monotonic() - start < 30
    # its own error, where it was raised, and the log; not its peer's fallout
    assert text.startswith("rank 1 failed: RuntimeError: boom in stage 1\n  at "), text
    assert re.search(r"programs/stage1\.py:\d+ in forward\n", text), text
    assert "rank 0" not in text and "Traceback" not in text
    log = Path(text.rsplit("full tracebacks: ", 1)[1])
    assert log.parent == tmp_path and "Traceback" in log.read_text() and "boom in stage 1" in log.read_text()


def test_a_full_disk_is_named_in_the_report(tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    try:
        with open("/dev/full", "w") as out:
            out.write("x")
    except OSError as exc:
        text = failure_text(failure_record(0, exc, [ROOT / "lcc", tmp_path]))
    else:
        pytest.fail("/dev/full took a write")
    assert text.startswith("rank 0 failed: OSError: [Errno 28] No space left on device"), text
    assert "test_failures.py" not in text  # a frame in lcc's code or the plan's programs only


def _when_training(metrics: Path, action: Callable[[], None]) -> threading.Thread:
    """Do `action` in a thread once the run has written its first metrics line."""

    def wait() -> None:
        deadline = time.monotonic() + 60
        while not (metrics.exists() and metrics.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.05)
        action()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def _rank_pid(rank: int) -> int:
    (pid,) = [p.pid for p in multiprocessing.active_children() if p.name == f"lcc-rank{rank}"]
    return pid


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_killed_rank_ends_the_run(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _when_training(metrics, lambda: os.kill(_rank_pid(1), signal.SIGKILL))
    with pytest.raises(RunError) as err:
        launch(plan(tmp_path), 100000, metrics, quiet=True)
    assert str(err.value).startswith("rank 1 exited with code -9 (killed by SIGKILL)\nfull tracebacks: ")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_stopped_rank_is_named_as_hung_within_the_timeout(tmp_path):
    metrics, stopped = tmp_path / "metrics.jsonl", []

    def stop() -> None:
        os.kill(_rank_pid(1), signal.SIGSTOP)
        stopped.append(time.monotonic())

    _when_training(metrics, stop)
    with pytest.raises(RunError) as err:
        launch(plan(tmp_path), 100000, metrics, quiet=True)
    took = time.monotonic() - stopped[0]
    first, log = str(err.value).split("\n")
    # its peer timed out waiting for it: that is not the cause
    assert re.fullmatch(r"rank 1 hung: no progress for \d+\.\d s \(last at step \d+, .+\); its process is stopped "
                        r"\(SIGSTOP, or a debugger\)", first), first
    assert took < 1.5 * TIMEOUT_S, (took, first)
    assert log.startswith("full tracebacks: ") and "rank 1: step " in Path(log.split(": ", 1)[1]).read_text()


def _group(pgid: int) -> list[int]:
    """The live processes of a process group (zombies waiting for init to reap them do not count)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(entry.name))
    return out


@dataclass
class _Cli:
    proc: subprocess.Popen
    folder: Path  # its metrics, its checkpoints, and tmp/: its temporary folder

    def training(self) -> None:
        """Wait until it has trained a step."""
        metrics, deadline = self.folder / "metrics.jsonl", time.monotonic() + 60
        while not (metrics.exists() and metrics.read_text().strip()):
            if self.proc.poll() is not None:
                raise AssertionError(f"the run ended with {self.proc.returncode}: {self.proc.communicate()[1]}")
            assert time.monotonic() < deadline, "the run did not start"
            time.sleep(0.05)
        assert len(_group(self.proc.pid)) >= 4  # the launcher, the fork server, two ranks, the resource tracker


def _start_cli(folder: Path, *spec: str) -> _Cli:
    """`lcc run train` in a session of its own (its process group), with a temporary folder of its own."""
    (folder / "tmp").mkdir()
    command = ["run", "train", str(plan(folder, *spec)), "--steps", "100000", "--metrics",
               str(folder / "metrics.jsonl"), "--checkpoint-dir", str(folder / "checkpoints")]
    proc = subprocess.Popen([sys.executable, "-m", "lcc", *command], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "TMPDIR": str(folder / "tmp")})
    return _Cli(proc, folder)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, _Cli]]:
    """Two runs of `lcc run train` started together, so that their start-ups (mostly importing torch, in the
    launcher and in its fork server) overlap: one to kill, one to terminate."""
    runs = {"killed": _start_cli(tmp_path_factory.mktemp("killed")),
            "terminated": _start_cli(tmp_path_factory.mktemp("terminated"), "train.checkpoint_every=1")}
    yield runs
    for run in runs.values():
        if run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGKILL)
        run.proc.communicate()


def _gone(pgid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while _group(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _group(pgid)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_no_process_outlives_a_killed_launcher(cli_runs):
    run = cli_runs["killed"]
    run.training()
    os.kill(run.proc.pid, signal.SIGKILL)
    run.proc.wait(timeout=10)
    assert _gone(run.proc.pid, 10), [Path(f"/proc/{p}/cmdline").read_text() for p in _group(run.proc.pid)]
    assert not [p.name for p in (run.folder / "tmp").iterdir() if p.name.startswith("lcc-")]


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_sigterm_stops_every_rank_and_says_where(cli_runs):
    run = cli_runs["terminated"]
    run.training()
    deadline = time.monotonic() + 30
    while latest(run.folder / "checkpoints") is None and time.monotonic() < deadline:
        time.sleep(0.05)
    run.proc.send_signal(signal.SIGTERM)
    _, stderr = run.proc.communicate(timeout=10)
    assert run.proc.returncode == 143, stderr
    found = re.search(r"^lcc run train: stopped at step (\d+); last checkpoint step (\d+) \(.+\)$", stderr, re.M)
    assert found and int(found[1]) >= int(found[2]) >= 1 and "Traceback" not in stderr, stderr
    assert _gone(run.proc.pid, 10)
    assert not [p.name for p in (run.folder / "tmp").iterdir() if p.name.startswith("lcc-")]
