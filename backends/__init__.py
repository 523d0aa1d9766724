"""Kernel backends (installed as `lcc.backends`): a torch reference for every op, fused kernels beside it."""
