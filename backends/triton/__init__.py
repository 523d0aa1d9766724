"""Fused MoE kernels for CUDA serve plans (Triton), behind the same `lcc.ops` calls as the CPU kernels.

`align` sorts routed rows by local expert into blocks (torch ops on the device, no host synchronisation);
`kernels` holds the two grouped GEMMs (gate and up with the SwiGLU epilogue; down with the routing weight),
each reading bf16 weights or int4 weights with per-group scales that it dequantises in registers (W4A16);
`experts` is what the ops call; `configs` picks the tiles per shape. Importing this package needs no
Triton: `require()` says clearly when Triton or a GPU is missing.
"""

from lcc.backends.triton.support import TritonMissing, available, require

__all__ = ["TritonMissing", "available", "require"]
