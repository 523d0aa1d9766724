"""The ranks lcc starts join through a store their launcher already listens on: the port they are handed
cannot be taken by another process between the moment it is chosen and the moment they connect."""

from __future__ import annotations

import queue
import socket

from lcc.runtime.supervise import Run
from tests.conftest import ROOT


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError:
        return False
    return True


def test_a_training_launcher_listens_on_the_port_it_hands_its_ranks(monkeypatch):
    import lcc.runtime.launch

    seen = []

    def supervise(self, target, args_of, watchdog_s, drain_s=None):  # instead of starting the 8 ranks
        ports = {args_of(rank, link)[0].port for rank, link in enumerate(self.links)}
        seen.extend((port, _listening(port)) for port in ports)

    monkeypatch.setattr(lcc.runtime.launch, "start_fork_server", lambda *args: None)
    monkeypatch.setattr(Run, "supervise", supervise)
    lcc.runtime.launch.launch(ROOT / "generated" / "tiny-moe", 1, quiet=True)
    assert len(seen) == 1 and seen[0][1], seen  # one port for every rank, listening when they are started


class _Process:
    """Stands for a calibration rank: records whether its port is listening when it starts, and reports."""

    seen: list[tuple[int, bool]] = []

    def __init__(self, target, args, daemon):
        self.rank, self.port, self.out = args[0], args[2], args[-1]
        self.exitcode = None

    def start(self) -> None:
        _Process.seen.append((self.port, _listening(self.port)))
        timed = [[1e-4], [3e-4]]  # the forward's and the whole call's batches
        self.out.put((self.rank, {"linear": [[16, 256, 256, *timed]], "experts": [[8, 4, 256, 256, *timed]],
                                  "attention": [[8, 64, 64, *timed]], "elementwise": [[1024, [1e-6]]],
                                  "optimizer": [[1024, [1e-5]]], "op": [1e-6],
                                  "concurrency": [[1, [1e-3] if self.rank == 0 else None], [2, [2e-3]]]}))
        self.exitcode = 0

    def join(self, timeout=None) -> None:
        pass

    def is_alive(self) -> bool:
        return False


class _Context:
    Process = _Process

    @staticmethod
    def Queue() -> queue.Queue:  # noqa: N802 - multiprocessing's name
        return queue.Queue()


def test_calibration_listens_on_the_port_it_hands_its_ranks(monkeypatch):
    import lcc.search.calibrate as calibrate

    monkeypatch.setattr(calibrate.multiprocessing, "get_context", lambda method: _Context())
    _Process.seen = []
    calibrate.measure(ranks=2, seconds=0.01)
    assert len(_Process.seen) == 2 and len({port for port, _ in _Process.seen}) == 1, _Process.seen
    assert all(listening for _, listening in _Process.seen), _Process.seen
