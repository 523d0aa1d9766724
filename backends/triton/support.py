"""Whether the Triton kernels can run here: Triton installed, and a CUDA device (or Triton's interpreter,
`TRITON_INTERPRET=1`, which runs the kernels on CPU tensors for tests)."""

from __future__ import annotations

import importlib.util
import os

import torch


class TritonMissing(RuntimeError):
    """The plan's kernels need Triton (and a GPU) and this machine lacks one."""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> str | None:
    """None when the kernels can run here, else why not (one sentence)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'lcc[gpu]')"
    if not interpreting() and not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


def require() -> None:
    why = available()
    if why is not None:
        raise TritonMissing(f"the Triton MoE kernels cannot run: {why}")
