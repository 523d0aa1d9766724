"""SIGINT and SIGTERM while a run goes on: the launcher notes them for its watch loop; a rank running in
the launcher's own process is interrupted where it is."""

from __future__ import annotations

import signal
import threading
from typing import Any


class Stop(BaseException):
    """A signal that stops a rank running in this process (a BaseException: no `except Exception` of the
    run's code takes it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopSignals:
    """SIGINT and SIGTERM while a run goes on: noted for the watch loop, or (`raising`: a rank in this
    process) raised as Stop where the run is. Only the main thread can take signals; elsewhere this does
    nothing."""

    def __init__(self, raising: bool):
        self.raising, self.signum = raising, None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.getsignal(s)
                signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if self.raising and first:
            raise Stop(signum)

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
