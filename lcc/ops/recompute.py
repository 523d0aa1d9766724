"""Activation checkpointing in generated programs: run a function keeping only its inputs, and run it
again in backward to rebuild what its backward needs.

Recomputation reproduces the forward exactly (the same routing, the same capacity drops, the same
collectives in the same order on every rank); while it runs, `ctx.recomputing` is true, so router
statistics are recorded once per token and no parameters are prefetched.
"""

from __future__ import annotations

from typing import Any

import torch.utils.checkpoint as checkpoint


def recompute(ctx: Any, fn: Any, *args: Any) -> Any:
    calls = 0

    def run(*a: Any) -> Any:
        nonlocal calls
        previous = ctx.recomputing
        ctx.recomputing = previous or calls > 0
        calls += 1
        try:
            return fn(*a)
        finally:
            ctx.recomputing = previous

    # the whole function runs again (no early stop), so every rank issues the same collectives
    with checkpoint.set_checkpoint_early_stop(False):
        return checkpoint.checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False)
