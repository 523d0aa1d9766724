"""How the ranks that lcc starts on one machine find each other: the process that starts them creates
torch.distributed's key-value store (a TCPStore) on a port the system chooses (port 0), holds it while the
ranks run, and passes its port on; each rank connects to that store as a client and joins the process
group through it (`init_process_group(store=...)`).

Asking the system for a free port, closing it and passing the number on would leave a window in which
another process can take the port before the ranks bind it; a store that is already listening leaves
none. Ranks started by torchrun join through torchrun's own store instead (env://: MASTER_ADDR,
MASTER_PORT), which `join_group` does when it is given no port.

Under torchrun each process is one rank of the plan, placed by torchrun: `check_torchrun` refuses a
placement that is not the plan's (its world, its ranks per node, its nodes, and each rank's node), and
`rank_outputs` names the outputs this rank writes, so that ranks of several torchrun agents started in
one folder never probe or write the same file. Nothing here imports torch until it is used: the command
line checks its outputs before torch is imported.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist

    from lcc.plan.types import Plan

HOST = "127.0.0.1"


def host_store(timeout_s: float = 300.0) -> dist.TCPStore:
    """A store for the ranks of one run to join through, listening on loopback at a port of the system's
    choosing (`store.port`). Keep it alive until the ranks have ended: they talk to it while they join
    and whenever they create a process group."""
    import torch.distributed as dist

    return dist.TCPStore(HOST, 0, is_master=True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def join_group(backend: str, rank: int, world: int, timeout_s: float, port: int | None = None,
               device_id: torch.device | None = None) -> None:
    """Join the world's default process group: through the store on loopback `port` (`host_store`, in the
    process that started the ranks), or with no port through torch's env:// rendezvous (under torchrun)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if port is None:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, device_id=device_id)
        return
    store = dist.TCPStore(HOST, port, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, device_id=device_id)


def torchrun_rank() -> int | None:
    """This process's rank where torchrun started it (RANK and WORLD_SIZE set), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"])
    return None


def rank_outputs(outputs: dict[str, Path | None]) -> dict[str, Path | None]:
    """The outputs of a training run (its flag -> its path) that this process writes: all of them, or under
    torchrun what this rank writes: the metrics on rank 0 only, its own part of the transcript and of the
    trace (`FILE.rank<N>`), and the checkpoint directory, which every rank writes into."""
    rank = torchrun_rank()
    if rank is None:
        return outputs
    from lcc.runtime.transcript import part_path

    mine = dict(outputs)
    if rank != 0 and "--metrics" in mine:
        mine["--metrics"] = None
    for flag in ("--transcript", "--trace"):
        if mine.get(flag) is not None:
            mine[flag] = part_path(Path(mine[flag]), rank)
    return mine


def refuse_under_torchrun(command: str) -> None:
    """Serving (`lcc run serve`, `lcc run generate`) starts every rank of its plan on this machine itself: as
    one of torchrun's ranks it would start the whole plan once per rank. LaunchRefused under torchrun."""
    from lcc.runtime.preflight import LaunchRefused

    rank = torchrun_rank()
    if rank is not None:
        raise LaunchRefused(f"torchrun started this process as rank {rank} of {os.environ['WORLD_SIZE']} (RANK, "
                            f"WORLD_SIZE); {command} does not run under torchrun: it starts every rank of its serve "
                            "plan on this machine itself, so start it once, without torchrun")


def check_torchrun(plan: Plan) -> None:
    """Under torchrun, this process's place is the plan's: torchrun's ranks per node (LOCAL_WORLD_SIZE,
    --nproc-per-node) are `cluster.gpus_per_node`, its nodes (GROUP_WORLD_SIZE, --nnodes) `cluster.nodes`,
    its world the plan's, and this rank runs on the plan's node for it (`node = rank // gpus_per_node`,
    GROUP_RANK) as the local rank the plan gives it (LOCAL_RANK, its GPU). LaunchRefused otherwise, naming
    the field; nothing to check outside torchrun."""
    from lcc.runtime.preflight import LaunchRefused

    rank = torchrun_rank()
    if rank is None:
        return
    per_node, world = plan.mesh.gpus_per_node, plan.world_size
    nodes = world // per_node
    layout = f"cluster.nodes {nodes} x cluster.gpus_per_node {per_node}"
    local_world = _env_int("LOCAL_WORLD_SIZE")
    if local_world is not None and local_world != per_node:
        raise LaunchRefused(f"torchrun started {local_world} rank{'s' * (local_world != 1)} on this node "
                            f"(--nproc-per-node {local_world}); the plan places {per_node} on each node "
                            f"(cluster.gpus_per_node: {per_node}): start torchrun with --nproc-per-node "
                            f"{per_node} on every node, or compile the spec for this cluster")
    group_world = _env_int("GROUP_WORLD_SIZE")
    if group_world is not None and group_world != nodes:
        raise LaunchRefused(f"torchrun's rendezvous joined {group_world} node{'s' * (group_world != 1)} "
                            f"(--nnodes); the plan spans {nodes} (cluster.nodes: {nodes}, {per_node} ranks each): "
                            f"start torchrun on {nodes} node{'s' * (nodes != 1)} with --nnodes {nodes}, or compile "
                            "the spec for this cluster")
    if int(os.environ["WORLD_SIZE"]) != world:
        raise LaunchRefused(f"torchrun started {os.environ['WORLD_SIZE']} ranks; the plan has {world} ({layout}): "
                            f"start torchrun with --nnodes {nodes} --nproc-per-node {per_node}")
    if not 0 <= rank < world:
        raise LaunchRefused(f"torchrun gave this process RANK {rank}; the plan's ranks are 0-{world - 1}")
    columns = plan.ranks.columns
    node = plan.ranks.rows[rank][columns.index("node")] if "node" in columns else rank // per_node
    here, local = _env_int("GROUP_RANK"), _env_int("LOCAL_RANK")
    if (here is not None and here != node) or (local is not None and local != rank - node * per_node):
        raise LaunchRefused(f"rank {rank} runs on torchrun's node {here if here is not None else '?'} as local "
                            f"rank {local if local is not None else '?'}; the plan places it on node {node} as "
                            f"local rank {rank - node * per_node} (node = rank // cluster.gpus_per_node, "
                            f"{per_node}; {layout}): each node must run cluster.gpus_per_node consecutive ranks, "
                            "node 0 the first")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value is not None and value.strip().lstrip("-").isdigit() else None
