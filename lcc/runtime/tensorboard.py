"""`lcc run train --tensorboard DIR`: rank 0 writes each step's figures as TensorBoard scalars (the
`tensorboard` extra): the loss, validation loss and perplexity where the step validated, learning rate,
gradient norm, tokens per second, peak memory, and each MoE layer's expert load imbalance (max / mean)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MISSING = "--tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'"
SCALARS = {"loss": "train/loss", "val_loss": "validation/loss", "val_perplexity": "validation/perplexity",
           "lr": "train/learning_rate", "grad_norm": "train/grad_norm", "tokens_per_second": "speed/tokens_per_second",
           "peak_memory_bytes": "memory/peak_bytes"}


def available() -> str | None:
    """None when TensorBoard event files can be written here, else why not."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return MISSING
    return None


class Board:
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def add(self, record: dict[str, Any]) -> None:
        step = record["step"]
        for key, tag in SCALARS.items():
            if isinstance(record.get(key), int | float):
                self.writer.add_scalar(tag, record[key], step)
        for site, stats in record.get("router", {}).items():
            self.writer.add_scalar(f"experts/imbalance/{site}", stats["imbalance_expert"], step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
