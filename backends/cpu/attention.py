"""Serving attention on CPU through lcc's native kernels (lcc.backends.cpu.native, csrc/decode_attention.cpp),
in float32 with one rounding to the activations' dtype: the step's rotary embeddings and cache writes
(`rope_cache`), and each single-token sequence's query heads over its context read from the paged KV cache
by slot (`decode_attention`)."""

from __future__ import annotations

import torch
from lcc.backends.cpu.native import load


def rope_cache(q_THd: torch.Tensor, k_TKd: torch.Tensor, v_TKd: torch.Tensor, both: torch.Tensor,
               sign: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """The queries rotated (returned), the keys rotated and the values written into the caches `[slots, KV, d]`
    at `slots [T]`; `both`, `sign`: float32 `[T, ..., d]` tables ((cos, cos) and (-sin, sin) per pair; another
    dtype is refused)."""
    return load().ops.rope_cache(q_THd, k_TKd, v_TKd, both, sign, slots, k_cache, v_cache)


def decode_attention(q_THd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor,
                     slots: torch.Tensor, lengths: torch.Tensor, out_THd: torch.Tensor) -> None:
    """Writes `out[rows[i]]` for each sequence i: q `[T, H, d]`, caches `[slots, KV, d]` (contiguous, the
    dtype of q: bfloat16 or float32), `slots [n, longest]` of which each sequence's first `lengths[i]` are
    its context in position order."""
    load().ops.decode_attention(q_THd, k_cache, v_cache, rows, slots, lengths, out_THd)
