"""Telling a hung rank from a slow one: a rank whose heartbeat has not moved for the collective timeout
while its peers wait for it (it is stopped, or has computed all that time), or, once peers have given up
waiting, one that has not moved for a timeout at all."""

from __future__ import annotations

import math
import os
from typing import Any

from lcc.runtime.heartbeat import Beats
from lcc.runtime.parent_death import proc_stat
from lcc.runtime.run_report import Verdict


class HangWatch:
    """What the launcher needs between two looks at its ranks to judge them: the CPU time each had used."""

    def __init__(self, beats: Beats, timeout_s: float):
        self.beats, self.timeout_s = beats, timeout_s
        self._cpu: dict[int, tuple[int, float]] = {}

    def _busy(self, rank: int, stat: list[str] | None, now: float) -> bool:
        """Running, or used a fifth of a core since the last look."""
        if stat is None:
            return False
        ticks = int(stat[11]) + int(stat[12])  # utime, stime
        before = self._cpu.get(rank)
        self._cpu[rank] = (ticks, now)
        used = (ticks - before[0]) / os.sysconf("SC_CLK_TCK") if before is not None else 0.0
        return stat[0] in "RD" or (before is not None and now > before[1] and used >= 0.2 * (now - before[1]))

    def hung(self, procs: list[Any], live: list[int], now: float, peers_failed: bool) -> Verdict | None:
        """A live rank whose heartbeat has not moved for the collective timeout while others wait for it: one
        stopped (SIGSTOP, a debugger), or computing all that time; once peers have given up waiting, one that
        has not moved for a timeout at all."""
        timeout = self.timeout_s
        beats, stats, busy = {}, {}, {}
        for rank in live:
            beat = self.beats.read(rank)
            stats[rank] = proc_stat(procs[rank].pid)
            busy[rank] = self._busy(rank, stats[rank], now)
            if not math.isnan(beat.time) and not beat.finished:
                beats[rank] = beat
        waiting = {r for r in beats if not busy[r] and stats[r] is not None and stats[r][0] == "S"}
        found = []
        for rank, beat in beats.items():
            age = now - beat.time
            stopped = stats[rank] is not None and stats[rank][0] in "Tt"
            if stopped and (age >= timeout or peers_failed):
                found.append((0, beat.time, rank, stopped))
            elif (busy[rank] and age >= (timeout / 2 if peers_failed else timeout)
                  and (peers_failed or waiting - {rank})):
                found.append((1, beat.time, rank, stopped))
            elif peers_failed and age >= timeout:
                found.append((2, beat.time, rank, stopped))
        if not found:
            return None
        _, t, rank, stopped = min(found)
        return Verdict("hung", rank=rank, age=now - t, beat=beats[rank], stopped=stopped)
