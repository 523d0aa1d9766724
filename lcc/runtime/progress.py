"""Rank 0's progress display: a bar on a terminal, one line per step otherwise (logs, CI)."""

from __future__ import annotations

import sys
from typing import Any


class StepProgress:
    def __init__(self, first: int, total: int, enabled: bool = True):
        self.total, self.enabled = total, enabled
        self.bar = None
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total, completed=first, info="")
            self.bar.start()

    def update(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        worst = max((r["imbalance_expert"] for r in record["router"].values()), default=1.0)
        info = (f"loss {record['loss']:.4f}  {record['tokens_per_second']:.0f} tokens/s  "
                f"router imbalance {worst:.2f}")
        if self.bar is not None:
            self.bar.update(self.task, advance=1, info=info)
        else:
            print(f"step {record['step'] + 1}/{self.total}  {info}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
