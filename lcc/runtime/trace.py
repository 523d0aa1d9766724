"""`lcc run train --trace FILE`: what each rank did and when, as a Chrome/Perfetto trace (ui.perfetto.dev,
chrome://tracing). Per rank (a process in the trace) three tracks: `actions` (each pipeline action of a
step: 0F1, 0B1, REDUCE_GRAD, ...), `compute` (the experts of each MoE layer) and `exchange` (each
all-to-all of the overlapped expert exchange, from when it began until its rows had arrived). Spans that
overlap between `exchange` and `compute` are communication hidden behind computation.

Each rank writes `FILE.rank<r>` (JSON lines); the launcher merges them into FILE and removes them (under
torchrun each rank keeps its part)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lcc.ops import timing
from lcc.runtime.transcript import part_path

TRACKS = ("actions", "compute", "exchange")


class ActionTrace:
    def __init__(self, path: Path, rank: int):
        self.path, self.rank = Path(path), rank
        self.spans: list[tuple[str, str, int, int]] = []
        self.step: int | None = None

    @contextlib.contextmanager
    def recording(self, step: int) -> Iterator[None]:
        self.step = step
        timing.SPANS = []
        try:
            yield
        finally:
            spans, timing.SPANS = timing.SPANS, None
            self.spans += [(track, f"{name} (step {step + 1})", a, b) for track, name, a, b in spans]

    def actions(self, actions: Iterable[Any]) -> Iterator[Any]:
        """The actions, each recorded from when it starts until the next one does."""
        for a in actions:
            start = timing.now()
            yield a
            timing.record("actions", str(a), start, timing.now())

    def write(self) -> None:
        with open(self.path, "w") as f:
            for track, name, a, b in self.spans:
                f.write(json.dumps({"rank": self.rank, "track": track, "name": name, "start_ns": a, "end_ns": b})
                        + "\n")


def merge(path: Path, world: int) -> None:
    """The ranks' parts into one Chrome trace at `path` (times in microseconds from the first span)."""
    spans = []
    for rank in range(world):
        part = part_path(path, rank)
        if part.is_file():
            spans += [json.loads(line) for line in part.read_text().splitlines() if line.strip()]
            part.unlink()
    origin = min((s["start_ns"] for s in spans), default=0)
    events: list[dict[str, Any]] = []
    for rank in sorted({s["rank"] for s in spans}):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        events += [{"name": "thread_name", "ph": "M", "pid": rank, "tid": i, "args": {"name": track}}
                   for i, track in enumerate(TRACKS)]
    for s in sorted(spans, key=lambda s: (s["rank"], s["start_ns"])):
        events.append({"name": s["name"], "ph": "X", "pid": s["rank"], "tid": TRACKS.index(s["track"]),
                       "ts": (s["start_ns"] - origin) / 1e3, "dur": max(s["end_ns"] - s["start_ns"], 0) / 1e3})
    Path(path).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}) + "\n")
