"""How the ranks that lcc starts on one machine find each other: the process that starts them creates
torch.distributed's key-value store (a TCPStore) on a port the system chooses (port 0), holds it while the
ranks run, and passes its port on; each rank connects to that store as a client and joins the process
group through it (`init_process_group(store=...)`).

Asking the system for a free port, closing it and passing the number on would leave a window in which
another process can take the port before the ranks bind it; a store that is already listening leaves
none. Ranks started by torchrun join through torchrun's own store instead (env://: MASTER_ADDR,
MASTER_PORT), which `join_group` does when it is given no port.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

HOST = "127.0.0.1"


def host_store(timeout_s: float = 300.0) -> dist.TCPStore:
    """A store for the ranks of one run to join through, listening on loopback at a port of the system's
    choosing (`store.port`). Keep it alive until the ranks have ended: they talk to it while they join
    and whenever they create a process group."""
    return dist.TCPStore(HOST, 0, is_master=True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def join_group(backend: str, rank: int, world: int, timeout_s: float, port: int | None = None,
               device_id: torch.device | None = None) -> None:
    """Join the world's default process group: through the store on loopback `port` (`host_store`, in the
    process that started the ranks), or with no port through torch's env:// rendezvous (under torchrun)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if port is None:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, device_id=device_id)
        return
    store = dist.TCPStore(HOST, port, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, device_id=device_id)
