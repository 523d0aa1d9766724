"""Serving attention on CPU through lcc's native kernels (lcc.backends.cpu.native, csrc/decode_attention.cpp),
in float32 with one rounding to the activations' dtype: the step's rotary embeddings and cache writes
(`rope_cache`), and each single-token sequence's query heads over its context read from the paged KV cache
by slot (`decode_attention`)."""

from __future__ import annotations

import torch
from lcc.backends.cpu.native import load


def _check(q_THd: torch.Tensor, k_cache: torch.Tensor) -> None:
    if q_THd.dtype not in (torch.bfloat16, torch.float32) or k_cache.dtype != q_THd.dtype:
        raise ValueError(f"the native attention kernels take bfloat16 or float32, not {q_THd.dtype} (cache "
                         f"{k_cache.dtype})")
    H, d, KV = q_THd.shape[1], q_THd.shape[2], k_cache.shape[1]
    if d % 16 or H % KV:
        raise ValueError(f"the native attention kernels need head_dim a multiple of 16 and query heads a multiple "
                         f"of key/value heads (head_dim {d}, {H} and {KV} heads)")


def rope_cache(q_THd: torch.Tensor, k_TKd: torch.Tensor, v_TKd: torch.Tensor, both: torch.Tensor,
               sign: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """The queries rotated (returned), the keys rotated and the values written into the caches `[slots, KV, d]`
    at `slots [T]`; `both`, `sign`: float32 `[T, ..., d]` tables ((cos, cos) and (-sin, sin) per pair)."""
    _check(q_THd, k_cache)
    T, H, d = q_THd.shape
    q_THd, k_TKd, v_TKd = q_THd.contiguous(), k_TKd.contiguous(), v_TKd.contiguous()
    both, sign = both.to(torch.float32).contiguous(), sign.to(torch.float32).contiguous()
    out = torch.empty_like(q_THd)
    load().lib.lcc_rope_cache(q_THd.data_ptr(), k_TKd.data_ptr(), v_TKd.data_ptr(), both.data_ptr(), sign.data_ptr(),
                              slots.data_ptr(), T, H, k_cache.shape[1], d, int(q_THd.dtype == torch.bfloat16),
                              out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), torch.get_num_threads())
    return out


def decode_attention(q_THd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor,
                     slots: torch.Tensor, lengths: torch.Tensor, out_THd: torch.Tensor) -> None:
    """Writes `out[rows[i]]` for each sequence i: q `[T, H, d]`, caches `[slots, KV, d]` (contiguous, the
    dtype of q: bfloat16 or float32), `slots [n, longest]` of which each sequence's first `lengths[i]` are
    its context in position order."""
    _check(q_THd, k_cache)
    T, H, d = q_THd.shape
    KV = k_cache.shape[1]
    q_THd, slots = q_THd.contiguous(), slots.contiguous()
    n, longest = slots.shape
    load().lib.lcc_decode_attention(q_THd.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), rows.data_ptr(),
                                    slots.data_ptr(), lengths.data_ptr(), n, longest, H, KV, d,
                                    int(q_THd.dtype == torch.bfloat16), out_THd.data_ptr(), torch.get_num_threads())
