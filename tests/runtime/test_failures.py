"""A failing or killed rank ends the whole run with a clear message, within the timeout; never a hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lcc.compiler.output import write
from lcc.compiler.plan import compile_plan
from lcc.runtime.launch import launch
from lcc.runtime.support import RunError
from lcc.spec import load_spec
from tests.conftest import ROOT, SPECS

LAYOUT = ["parallelism.pp=2", "parallelism.dp=1", "parallelism.ep=1", "cluster.gpus_per_node=2",
          "train.seq_len=32", "train.global_batch=8", "train.collective_timeout_s=30"]


def plan(tmp_path: Path, *extra: str) -> Path:
    out = tmp_path / "plan"
    write(compile_plan(load_spec(SPECS / "tiny-moe.yaml", [*LAYOUT, *extra])), out)
    return out


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_rank_that_raises_ends_the_run(tmp_path):
    folder = plan(tmp_path)
    program = folder / "programs" / "stage1.py"
    broken = program.read_text().replace('    """P: this', '    raise RuntimeError("boom in stage 1")\n    """P: this')
    program.write_text(broken)
    start = time.monotonic()
    with pytest.raises(RunError) as err:
        launch(folder, 3, quiet=True)
    assert "rank 1 failed" in str(err.value) and "boom in stage 1" in str(err.value)
    assert time.monotonic() - start < 120


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_killed_rank_ends_the_run(tmp_path):
    folder = plan(tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "lcc", "run", "train", str(folder), "--steps", "100000",
                             "--metrics", str(metrics)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, "the run did not start"
        time.sleep(0.5)
    # ranks are forked by the launcher's fork server (a child of the lcc process)
    servers = [p for p in _children(proc.pid) if "forkserver" in Path(f"/proc/{p}/cmdline").read_text(errors="ignore")]
    ranks = [r for server in servers for r in _children(server)]
    assert ranks
    os.kill(ranks[-1], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 1
    assert "exited with code -9" in stderr and "Traceback" not in stderr
