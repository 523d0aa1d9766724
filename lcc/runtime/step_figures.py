"""A training step's figures from what the step holds: the gradients' squared norm, the routers' statistics
on the host, and the step's peak memory. Pure functions; the rank engine calls them in its step actions."""

from __future__ import annotations

import resource
from typing import Any

import torch

from lcc.runtime.memory import LiveTensorBytes

ROW = 4096  # elements per partial sum of a gradient's squared norm


def squared_norm(g: torch.Tensor) -> torch.Tensor:
    """The sum of squares of `g`'s elements, in float64. Below float64, each row of ROW elements is summed in
    g's own dtype (the norm of a short row is accurate to a rounding or two) and the rows' squares in float64:
    one read of the gradient, no float64 copy of it."""
    if g.dtype == torch.float64:
        return g.square().sum()
    flat = g.reshape(-1)
    rows = flat.numel() // ROW * ROW
    head = torch.linalg.vector_norm(flat[:rows].view(-1, ROW), dim=1, dtype=torch.float32)
    tail = torch.linalg.vector_norm(flat[rows:], dtype=torch.float32).reshape(1)
    return torch.cat([head, tail]).double().square().sum()


def router_summary(load: list[float], k_hist: list[float], ep: int) -> dict[str, Any]:
    """A router's statistics for the metrics, from host copies of its step's loads and k histogram (the
    step's one read of them, in the rank engine's reduce_metrics action)."""
    tokens = sum(k_hist)
    per = len(load) // ep
    per_rank = [sum(load[r * per:(r + 1) * per]) for r in range(ep)]
    return {"experts_per_token": sum(k * c for k, c in enumerate(k_hist)) / max(tokens, 1.0),
            "k_histogram": k_hist[1:], "load_per_expert": load,
            "imbalance_expert": imbalance(load), "imbalance_ep_rank": imbalance(per_rank)}


def imbalance(load: list[float]) -> float:
    """max / mean of a load vector (1.0 = perfectly even; 0 load counts as even): lcc.model.stats.imbalance
    on a host list."""
    mean = sum(load) / len(load)
    return max(load) / mean if mean > 0 else 1.0


def peak_bytes(memory: LiveTensorBytes | None, device: torch.device) -> int:
    """This step's peak: live tensors when tracked; the CUDA allocator's peak; else the peak RSS."""
    if memory is not None:
        return memory.peak
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
