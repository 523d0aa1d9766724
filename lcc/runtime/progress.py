"""Rank 0's progress display: a bar on a terminal, one line per step otherwise (logs, CI), and a summary
at the end. Steps count from 1, as in the metrics and in checkpoint names (the number of optimizer steps
completed)."""

from __future__ import annotations

import sys
import time
from typing import Any


class StepProgress:
    def __init__(self, first: int, total: int, enabled: bool = True):
        self.first, self.total, self.enabled = first, total, enabled
        self.records: list[dict[str, Any]] = []
        self.start = time.perf_counter()
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
        self.records.append(record)
        worst = max((r["imbalance_expert"] for r in record["router"].values()), default=1.0)
        info = (f"loss {record['loss']:.4f}  {record['tokens_per_second']:.0f} tokens/s  "
                f"router imbalance {worst:.2f}")
        if "val_loss" in record:
            info += f"  val loss {record['val_loss']:.4f} (perplexity {record['val_perplexity']:.2f})"
        if self.bar is not None:
            self.bar.update(self.task, advance=1, info=info)
        else:
            print(f"step {record['step']}/{self.total}  {info}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()

    def summary(self, checkpoint: str | None) -> None:
        """The run in one line: steps, tokens, time, tokens/s, the final loss, the checkpoint written."""
        if not self.enabled or not self.records:
            return
        self.close()
        self.bar = None
        seconds = time.perf_counter() - self.start
        tokens = sum(r["tokens"] for r in self.records)
        print(f"done: steps {self.first + 1}-{self.records[-1]['step']} of {self.total}, {tokens:,} tokens in "
              f"{seconds:.1f} s ({tokens / seconds:,.0f} tokens/s), final loss {self.records[-1]['loss']:.4f}; "
              f"checkpoint: {checkpoint or 'none written'}", flush=True)
