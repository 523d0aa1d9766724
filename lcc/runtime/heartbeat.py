"""Heartbeats: each rank says, in memory shared with its launcher, when it last moved and what it is doing.

A rank beats at every pipeline and step action (the step, and what it is doing); the launcher reads the
beats to name a rank that hangs, and to say at which step a stopped run was.
"""

from __future__ import annotations

import ctypes
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

N_VALUES = 4  # per rank: time of the last beat, steps completed, the step in progress, finished
LABEL_BYTES = 96  # per rank: what it is doing


def label(text: str) -> bytes:
    return text.encode()[:LABEL_BYTES].ljust(LABEL_BYTES, b"\0")


@dataclass(frozen=True)
class Beat:
    time: float  # time.monotonic() of the last beat; nan: none yet
    completed: float  # steps completed (nan: not known yet)
    step: int  # the step in progress, from 0 (-1: none yet)
    finished: bool
    doing: str

    def where(self) -> str:
        return f"step {self.step + 1}, {self.doing}" if self.step >= 0 else self.doing


class Heartbeat:
    """One rank's heartbeat, in memory its launcher reads: when it last moved (time.monotonic, one clock for
    every process of the machine), the steps it has completed, the step it is in and what it is doing.
    A beat is a few stores: cheap enough for every action."""

    def __init__(self, values: Any, labels: Any, rank: int):
        self.values, self.labels = values, labels
        self.at, self.label_at = rank * N_VALUES, rank * LABEL_BYTES

    def beat(self, doing: bytes | str) -> None:
        self.labels[self.label_at:self.label_at + LABEL_BYTES] = doing if isinstance(doing, bytes) else label(doing)
        self.values[self.at] = time.monotonic()

    def step(self, step: int) -> None:
        """Step `step` (from 0) begins."""
        self.values[self.at + 2] = step
        self.beat("beginning the step")

    def completed(self, steps: int) -> None:
        self.values[self.at + 1] = steps
        self.beat(f"after step {steps}")

    def finished(self) -> None:
        self.values[self.at + 3] = 1.0
        self.beat("finished")


class Beats:
    """The heartbeats of every rank: shared memory for ranks in processes of their own (`context`: the
    multiprocessing context that starts them), plain memory for a rank in this process."""

    def __init__(self, world: int, context: Any = None):
        self.world = world
        if context is not None:
            self.values = context.RawArray("d", world * N_VALUES)
            self.labels = context.RawArray("c", world * LABEL_BYTES)
        else:
            self.values = (ctypes.c_double * (world * N_VALUES))()
            self.labels = ctypes.create_string_buffer(world * LABEL_BYTES)
        for rank in range(world):
            self.values[rank * N_VALUES:rank * N_VALUES + 3] = [math.nan, math.nan, -1.0]

    def rank(self, rank: int) -> Heartbeat:
        return Heartbeat(self.values, self.labels, rank)

    def read(self, rank: int) -> Beat:
        at, label_at = rank * N_VALUES, rank * LABEL_BYTES
        t, completed, step, finished = self.values[at:at + N_VALUES]
        doing = bytes(self.labels[label_at:label_at + LABEL_BYTES]).rstrip(b"\0").decode(errors="replace")
        return Beat(t, completed, int(step), finished > 0, doing)

    def completed(self) -> int | None:
        """Steps every rank has completed; None while a rank has not said (it is still starting)."""
        steps = [self.read(r).completed for r in range(self.world)]
        return None if any(math.isnan(s) for s in steps) else int(min(steps))


class _Beating(list):
    """A list the engine walks once per step (its pipeline actions, its step actions): taking an item is a
    heartbeat saying which."""

    def __init__(self, items: list[Any], heartbeat: Heartbeat, what: str):
        super().__init__(items)
        self.heartbeat = heartbeat
        self.labels = [label(f"{what} {i + 1}/{len(items)}: {getattr(a, 'kind', a)}" if what == "step action"
                             else f"{what} {i + 1}/{len(items)}: {a}") for i, a in enumerate(items)]

    def __iter__(self) -> Iterator[Any]:
        beat = self.heartbeat.beat
        for i, item in enumerate(list.__iter__(self)):
            beat(self.labels[i] if i < len(self.labels) else f"{item}")
            yield item


def watch_engine(engine: Any, heartbeat: Heartbeat) -> None:
    """Beat at every pipeline action and every step action `engine` (a RankEngine) takes."""
    engine.actions = _Beating(engine.actions, heartbeat, "pipeline action")
    engine.step_actions = _Beating(engine.step_actions, heartbeat, "step action")
