"""Token alignment: the routed rows of a step sorted by local expert and padded into blocks of `block_m`
rows, one expert per block, so that one grouped-GEMM program computes one block against one expert.

Built on the rows' device with sizes known on the host beforehand (the row count and an upper bound on the
blocks), so nothing is read back to the host: a block past the last real one has expert -1 and its
programs return at once. `align` takes any rows (torch ops: a stable sort); `align_segments` takes rows
already grouped by expert (one Triton program).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Alignment:
    rows: torch.Tensor  # int32 [blocks * block_m]: the routed row at each padded position; n_rows where padding
    block_expert: torch.Tensor  # int32 [blocks]: the block's local expert, -1 to skip
    n_rows: int  # routed rows (the sentinel in `rows`)
    block_m: int

    @property
    def max_blocks(self) -> int:
        return self.block_expert.numel()


def max_blocks(n_rows: int, n_experts: int, block_m: int) -> int:
    """At most one partial block per expert that has rows, plus the full ones."""
    return min(n_rows, n_experts) + n_rows // block_m


def align(expert_R: torch.Tensor, n_experts: int, block_m: int) -> Alignment:
    """`expert_R`: each routed row's local expert; rows outside [0, n_experts) (other ranks' experts,
    unused slots) are skipped. Rows of one expert keep their order."""
    device = expert_R.device
    R = expert_R.numel()
    key = expert_R.reshape(-1).to(torch.int64)
    key = torch.where((key >= 0) & (key < n_experts), key, n_experts)  # skipped rows sort last
    counts = torch.zeros(n_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:n_experts]
    blocks_E = (counts + block_m - 1) // block_m
    block_end_E = torch.cumsum(blocks_E, 0)
    row_start_E = torch.cumsum(counts, 0) - counts
    order = torch.argsort(key, stable=True)
    sorted_key = key.index_select(0, order)
    valid = sorted_key < n_experts
    e = sorted_key.clamp(max=n_experts - 1)
    rank_in_expert = torch.arange(R, device=device) - row_start_E.index_select(0, e)
    nb = max_blocks(R, n_experts, block_m)
    padded = nb * block_m
    dest = torch.where(valid, (block_end_E - blocks_E).index_select(0, e) * block_m + rank_in_expert, padded)
    rows = torch.full((padded + 1,), R, dtype=torch.int32, device=device)
    rows.scatter_(0, dest, order.to(torch.int32))
    block_expert = torch.searchsorted(block_end_E, torch.arange(nb, device=device), right=True)
    block_expert = torch.where(block_expert < n_experts, block_expert, -1).to(torch.int32)
    return Alignment(rows[:padded], block_expert, R, block_m)


def align_segments(counts_E: torch.Tensor, n_rows: int, block_m: int) -> Alignment:
    """`align` for rows already grouped by expert (`counts_E` rows each, on the device; what the programs
    hold after the exchange), in one Triton program instead of a sort and a dozen torch ops: at decode
    sizes the launches, not the bytes, are what alignment costs."""
    from lcc.backends.triton import ops  # noqa: F401  (defines torch.ops.lcc.triton_align_segments)

    nb = max_blocks(n_rows, counts_E.numel(), block_m)
    rows = torch.empty(nb * block_m, dtype=torch.int32, device=counts_E.device)
    block_expert = torch.empty(nb, dtype=torch.int32, device=counts_E.device)
    if nb:
        torch.ops.lcc.triton_align_segments(counts_E, n_rows, block_m, rows, block_expert)
    return Alignment(rows, block_expert, n_rows, block_m)


def segment_experts(counts_E: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Rows already grouped by expert (`counts_E` rows each, on the device): each row's expert."""
    return torch.repeat_interleave(torch.arange(counts_E.numel(), device=counts_E.device), counts_E,
                                   output_size=n_rows)
