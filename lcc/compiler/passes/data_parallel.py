"""Data parallelism: which reductions make each gradient whole, in buckets, per stage.

Dense parameters are summed over dp (and over tp when each TP rank saw only its share of the tokens:
the routers), experts over edp. Without ZeRO, and with ZeRO 1, a bucket is all-reduced once per step
after the last backward. ZeRO 2 reduce-scatters each parameter's gradient over its ZeRO axis as soon as
backward has produced it (every micro-batch); ZeRO 3's programs do that in backward themselves. What
remains (tp for the routers) is all-reduced once per step on the rank's pieces.
"""

from __future__ import annotations

from lcc.compiler.state import CompileState
from lcc.plan.types import GradBucket, Parameter, chunk_size

NAME = "data_parallel"
DESCRIPTION = "bucketed gradient reduction: dense parameters over dp, expert parameters over edp"

BUCKET_ELEMENTS = 25_000_000  # per-rank elements per bucket (shards, not global sizes)


def _elements(p: Parameter, zero: int) -> int:
    """What the rank holds of the gradient when the step's reduction runs."""
    return chunk_size(p.local_numel, p.zero.parts) if zero >= 2 else p.local_numel


def owner(p: Parameter, stage: int, pp: int) -> int | None:
    """The stage whose buckets hold `p` on the pipeline rank of `stage`: its first stage there (a tied
    embedding on two stages of one pipeline rank is one tensor, with one gradient to reduce)."""
    here = [s for s in p.stages if s % pp == stage % pp]
    return min(here) if here else None


def run(state: CompileState) -> None:
    par = state.spec.parallelism
    zero = state.memory.zero if state.memory is not None else 0
    sizes = {"dp": par.dp, "tp": par.tp, "edp": par.edp,
             "kv": max(1, par.tp // state.spec.model.attention.n_kv_heads)}
    for stage in range(len(state.stage_bounds)):
        buckets: list[GradBucket] = []
        held = [p for p in state.params.values() if stage in p.stages]
        for axes in dict.fromkeys(tuple(p.grad_reduce) for p in held):  # edp; dp; dp, tp; dp, kv
            zero_axis = "edp" if axes == ("edp",) else "dp"
            # ZeRO 2: a gradient is reduce-scattered each time this stage's backward produces it (a tied
            # embedding by both of its stages)
            produced = [p for p in held if tuple(p.grad_reduce) == axes]
            if zero == 2 and sizes[zero_axis] > 1 and produced:
                buckets.append(GradBucket("reduce_scatter", [zero_axis], [p.name for p in reversed(produced)],
                                          sum(p.local_numel for p in produced), "backward"))
            group = [p for p in produced if owner(p, stage, par.pp) == stage]
            step_axes = [a for a in axes if sizes[a] > 1 and not (zero >= 2 and a == zero_axis)]
            if not step_axes:
                continue
            current: list[Parameter] = []
            for p in reversed(group):  # backward produces gradients from the last layer first
                current.append(p)
                if sum(_elements(q, zero) for q in current) >= BUCKET_ELEMENTS:
                    buckets.append(_bucket(step_axes, current, zero))
                    current = []
            if current:
                buckets.append(_bucket(step_axes, current, zero))
        if buckets:
            state.buckets[stage] = buckets


def _bucket(axes: list[str], params: list[Parameter], zero: int) -> GradBucket:
    return GradBucket("all_reduce", axes, [p.name for p in params], sum(_elements(p, zero) for p in params))
