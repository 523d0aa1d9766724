"""`lcc run train` under torchrun on two nodes, both on this machine: two torchrun agents (`--nnodes 2
--nproc-per-node 2`, c10d rendezvous on loopback) started in one folder train a plan of 2 nodes x 2 ranks to
the losses lcc's own launcher reaches, with one metrics file, one transcript part per rank and one
checkpoint; a placement that is not the plan's is refused naming the field; serving refuses torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lcc.cli import app
from lcc.compiler.output import write
from lcc.compiler.plan import compile_plan
from lcc.plan import read_plan
from lcc.runtime.launch import launch, read_metrics
from lcc.runtime.preflight import LaunchRefused
from lcc.runtime.rendezvous import HOST, check_torchrun, host_store, rank_outputs
from lcc.spec import load_spec
from tests.conftest import ROOT, SPECS
from tests.runtime.equivalence import SMALL

SPEC = SPECS / "tiny-moe.yaml"
# what both launchers run: 2 nodes x 2 ranks (dp 4 x ep 4, the EP group over both nodes, the hierarchical
# exchange, a token's experts on one node), float64 and small shapes, one micro-batch
OVERRIDES = [*SMALL, "cluster.nodes=2", "cluster.gpus_per_node=2", "parallelism.pp=1", "parallelism.dp=4",
             "parallelism.tp=1", "parallelism.ep=4", "parallelism.pipeline.microbatches=1",
             "parallelism.expert_exchange=hierarchical", "routing.groups.sets=2", "routing.groups.max_sets=1"]
STEPS = 3
NODES, PER_NODE = 2, 2
AGENTS_S = 200  # both agents' run, rendezvous included; then they are stopped
STOP_S = 30  # for an agent to stop its ranks on SIGTERM before it is killed
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def _agent(node: int, port: int, folder: Path) -> tuple[subprocess.Popen, Path]:
    """One torchrun agent (one node) on loopback, joining the rendezvous whose store listens on `port`;
    its output in `folder/agent<node>.log`."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(GLOO_SOCKET_IFNAME="lo", LCC_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
    sets = [arg for o in OVERRIDES for arg in ("--set", o)]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NODES), "--nproc-per-node",
               str(PER_NODE), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{HOST}:{port}", "--rdzv-id", "lcc-test",
               "--rdzv-conf", "is_host=false,join_timeout=120", "--local-addr", HOST, "--max-restarts", "0",
               "-m", "lcc", "run", "train", str(SPEC), *sets, "--steps", str(STEPS), "--metrics", "metrics.jsonl",
               "--transcript", "transcript.jsonl", "--checkpoint-dir", "ckpt"]
    log = folder / f"agent{node}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (torchrun then stops its ranks), and SIGKILL to the agent's process group if it lingers."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_S)


def _run_agents(folder: Path) -> list[tuple[int | None, Path]]:
    """Both agents, started together in `folder` and bounded by AGENTS_S: their exit codes and logs."""
    store = host_store(AGENTS_S)  # the rendezvous' store, listening before the agents start: no port to race for
    agents = [_agent(node, store.port, folder) for node in range(NODES)]
    try:
        deadline = time.monotonic() + AGENTS_S
        while time.monotonic() < deadline and any(p.poll() is None for p, _ in agents):
            if any(p.poll() not in (None, 0) for p, _ in agents):  # one failed: the other would wait for it
                break
            time.sleep(0.2)
    finally:
        for proc, _ in agents:
            _stop(proc)
        del store
    return [(proc.returncode, log) for proc, log in agents]


@pytest.mark.slow
@pytest.mark.timeout(2 * AGENTS_S)
def test_two_torchrun_agents_train_as_the_local_launcher(tmp_path):
    spec = load_spec(SPEC, OVERRIDES)
    assert (spec.cluster.nodes, spec.cluster.gpus_per_node) == (NODES, PER_NODE)
    plan_dir = tmp_path / "plan"
    write(compile_plan(spec), plan_dir)
    launch(plan_dir, STEPS, tmp_path / "local.jsonl", quiet=True)
    local = [r["loss"] for r in read_metrics(tmp_path / "local.jsonl")]

    folder = tmp_path / "agents"
    folder.mkdir()
    results = _run_agents(folder)
    for node, (code, log) in enumerate(results):
        assert code == 0, f"agent {node} exited {code} ({log}):\n{log.read_text()[-6000:]}"
    records = read_metrics(folder / "metrics.jsonl")  # rank 0's alone: one record per step
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records] == pytest.approx(local, rel=1e-12, abs=0)
    world = NODES * PER_NODE
    parts = sorted(folder.glob("transcript.jsonl*"))
    assert [p.name for p in parts] == [f"transcript.jsonl.rank{r}" for r in range(world)]
    for rank, part in enumerate(parts):
        lines = [json.loads(line) for line in part.read_text().splitlines()]
        assert lines and {line["rank"] for line in lines} == {rank}
    assert (folder / "ckpt" / "latest").read_text().strip() == f"step-{STEPS:06d}"
    assert len(list((folder / "ckpt" / f"step-{STEPS:06d}").glob("*.distcp"))) == world


@pytest.fixture(scope="module")
def two_node_plan(tmp_path_factory) -> Path:
    plan_dir = tmp_path_factory.mktemp("torchrun") / "plan"
    write(compile_plan(load_spec(SPEC, OVERRIDES)), plan_dir)
    return plan_dir


def _torchrun(monkeypatch, rank: int, local_rank: int, per_node: int, node: int, nodes: int) -> None:
    """The environment torchrun gives a rank."""
    for name, value in {"RANK": rank, "WORLD_SIZE": per_node * nodes, "LOCAL_RANK": local_rank,
                        "LOCAL_WORLD_SIZE": per_node, "GROUP_RANK": node, "GROUP_WORLD_SIZE": nodes,
                        "MASTER_ADDR": HOST, "MASTER_PORT": 1}.items():
        monkeypatch.setenv(name, str(value))


@pytest.mark.parametrize(("rank", "local_rank", "node"), [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)])
def test_the_plans_placement_is_accepted(two_node_plan, monkeypatch, rank, local_rank, node):
    _torchrun(monkeypatch, rank, local_rank, PER_NODE, node, NODES)
    check_torchrun(read_plan(two_node_plan))


@pytest.mark.parametrize(("place", "says"), [
    ((0, 0, 4, 0, 1), "torchrun started 4 ranks on this node (--nproc-per-node 4); the plan places 2 on each node "
                      "(cluster.gpus_per_node: 2)"),
    ((0, 0, 1, 0, 4), "torchrun started 1 rank on this node (--nproc-per-node 1); the plan places 2 on each node "
                      "(cluster.gpus_per_node: 2)"),
    ((0, 0, 2, 0, 4), "torchrun's rendezvous joined 4 nodes (--nnodes); the plan spans 2 (cluster.nodes: 2"),
    ((0, 0, 2, 0, 1), "torchrun's rendezvous joined 1 node (--nnodes); the plan spans 2 (cluster.nodes: 2"),
    ((2, 0, 2, 0, 2), "rank 2 runs on torchrun's node 0 as local rank 0; the plan places it on node 1 as local rank 0 "
                      "(node = rank // cluster.gpus_per_node, 2"),
    ((1, 0, 2, 0, 2), "rank 1 runs on torchrun's node 0 as local rank 0; the plan places it on node 0 as local rank 1"),
])
def test_a_placement_that_is_not_the_plans_is_refused_before_any_rank_starts(two_node_plan, tmp_path, monkeypatch,
                                                                             place, says):
    _torchrun(monkeypatch, *place)
    with pytest.raises(LaunchRefused) as refused:
        launch(two_node_plan, 1, tmp_path / "metrics.jsonl", quiet=True)
    assert says in str(refused.value)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_each_rank_checks_only_what_it_writes(monkeypatch, tmp_path):
    outputs = {"--metrics": tmp_path / "m.jsonl", "--transcript": tmp_path / "t.jsonl",
               "--checkpoint-dir": tmp_path / "ckpt"}
    assert rank_outputs(outputs) == outputs  # not under torchrun: the launcher writes them all
    _torchrun(monkeypatch, 0, 0, PER_NODE, 0, NODES)
    assert rank_outputs(outputs) == {**outputs, "--transcript": tmp_path / "t.jsonl.rank0"}
    _torchrun(monkeypatch, 3, 1, PER_NODE, 1, NODES)
    assert rank_outputs(outputs) == {"--metrics": None, "--transcript": tmp_path / "t.jsonl.rank3",
                                     "--checkpoint-dir": tmp_path / "ckpt"}


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_serving_refuses_to_run_under_torchrun(command, monkeypatch):
    _torchrun(monkeypatch, 0, 0, PER_NODE, 0, NODES)
    result = CliRunner().invoke(app, ["run", command, str(SPEC)])
    assert result.exit_code == 2, result.output
    assert f"lcc run {command} does not run under torchrun" in result.output
