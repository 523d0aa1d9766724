"""Deterministic initialisation: a parameter's values depend only on (seed, its global name, expert id).

Any rank can therefore materialise exactly its own shard, and the shard equals the matching slice of the
reference model: an expert's weights are drawn from a generator keyed by the expert id, never from a
stream shared with other experts.
"""

from __future__ import annotations

import hashlib
import math

import torch


def generator(seed: int, name: str, expert: int | None = None) -> torch.Generator:
    key = f"{seed}/{name}" + ("" if expert is None else f"/expert{expert}")
    digest = hashlib.sha256(key.encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def normal(shape: tuple[int, ...], std: float, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    # drawn in float64 on the CPU so the values do not depend on the target dtype's sampling path
    return (torch.randn(shape, generator=g, dtype=torch.float64) * std).to(dtype)


def orthogonal(shape: tuple[int, int], g: torch.Generator, dtype: torch.dtype, gain: float = 1.0) -> torch.Tensor:
    rows, cols = shape
    a = torch.randn((max(rows, cols), min(rows, cols)), generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # unique decomposition
    if rows < cols:
        q = q.T
    return (gain * q[:rows, :cols]).to(dtype)


def he_normal(shape: tuple[int, ...], fan_in: int, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return normal(shape, math.sqrt(2.0 / fan_in), g, dtype)
