"""Tile configurations per shape, chosen from a small table (no autotuning: a first call compiles one
kernel per shape class and stays fast).

The class is the rows an expert gets on average. Decode steps give each expert a few rows: the GEMMs
are bound by reading the weights, so blocks are short (`BLOCK_M` 16, the smallest tensor-core tile) and
narrow (32 columns), so that many programs keep the weight reads in flight (LongCat-2.0's 125 experts of
width 256 at 64 routed rows: about 50 experts with rows, 8 column tiles each, 400 programs for 132
multiprocessors). Prefill gives experts hundreds of
rows: taller blocks reuse each weight tile across more rows. float32 activations (verification-grade
serving) multiply in IEEE float32 on the CUDA cores, with tiles small enough to stay in registers.
benchmarks/gpu/compile_sm90.py compiles every class for Hopper here and checks shared memory and spills.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# (largest average rows per expert, tiles); the last row takes everything larger
TABLE = (
    (16, Tiles(16, 32, 128, 4, 4)),
    (64, Tiles(32, 64, 128, 4, 4)),
    (256, Tiles(64, 128, 64, 8, 4)),
    (None, Tiles(128, 128, 64, 8, 3)),
)


SHARED_BYTES = 200 * 1024  # of a Hopper multiprocessor's 227 KiB per block, kept for the pipeline's buffers


def tiles_for(rows: int, n_experts: int, k_dim: int, group_size: int | None, act_bytes: int = 2,
              weight_bytes: float = 0.5, weight_tiles: int = 1) -> Tiles:
    """Tiles for `rows` routed rows over `n_experts` local experts, multiplying along `k_dim`; int4 tiles
    never straddle a scale group (`block_k` divides `group_size`). The pipeline keeps at most as many stages
    as fit in shared memory: per stage an activation tile (`act_bytes` an element) and `weight_tiles` weight
    tiles (`weight_bytes` an element: 0.5 for int4, 2 for bf16, 4 for float32)."""
    per = rows / max(n_experts, 1)
    tiles = next(t for limit, t in TABLE if limit is None or per <= limit)
    if act_bytes >= 4:  # IEEE float32 multiplies on the CUDA cores, operands in registers: small tiles or spills
        tiles = Tiles(min(tiles.block_m, 32), min(tiles.block_n, 64), min(tiles.block_k, 32), tiles.num_warps,
                      tiles.num_stages)
    block_k = min(tiles.block_k, _pow2_at_least(k_dim))
    if group_size is not None:
        block_k = min(block_k, group_size)
    block_k = max(block_k, 16)
    stage = tiles.block_m * block_k * act_bytes + weight_tiles * tiles.block_n * block_k * weight_bytes
    stages = max(2, min(tiles.num_stages, int(SHARED_BYTES // stage)))
    return Tiles(tiles.block_m, tiles.block_n, block_k, tiles.num_warps, stages)


def _pow2_at_least(n: int) -> int:
    p = 16
    while p < n:
        p *= 2
    return p
