"""Data parallelism: which reductions make each gradient whole, in buckets, per stage.

Dense parameters are summed over dp (and over tp when each TP rank saw only its share of the tokens:
the routers, and the norms under sequence parallelism; over dp and tp at once, one all-reduce over the
stage's ranks), experts over edp. A bucket is issued by the runtime as soon as backward has produced all
of its gradients, so that it overlaps the rest of backward, in the order listed (the reverse of the
forward's, as backward produces them):

- without ZeRO and with ZeRO 1: all-reduced once per step, in the stage's last backward;
- ZeRO 2: reduce-scattered over the ZeRO axis into this rank's pieces (any further axis all-reduced on
  the pieces) once per step when the whole gradients fit in the device memory next to everything else
  (the cost model decides: `step`), otherwise in every backward (`microbatch`);
- ZeRO 3: the programs reduce-scatter in backward (in the last backward of the step, or in every one, as
  for ZeRO 2); what remains (tp for the routers) is all-reduced on the pieces once per step.
"""

from __future__ import annotations

from lcc.actions import stage_rank
from lcc.compiler.cost.traffic import BUCKET_ELEMENTS
from lcc.compiler.state import CompileState
from lcc.plan.types import GradBucket, Parameter, chunk_size

NAME = "data_parallel"
DESCRIPTION = ("bucketed gradient reduction issued during backward: dense parameters over dp, expert parameters "
               "over edp")


def owner(p: Parameter, stage: int, pp: int, schedule: str) -> int | None:
    """The stage whose buckets hold `p` on the pipeline rank of `stage`: its first stage there (a tied
    embedding on two stages of one pipeline rank is one tensor, with one gradient to reduce: zbv's V puts
    the first and the last stage on rank 0). `schedule`: the plan's schedule kind (lcc.actions.stage_rank)."""
    rank = stage_rank(stage, pp, schedule)
    here = [s for s in p.stages if stage_rank(s, pp, schedule) == rank]
    return min(here) if here else None


def run(state: CompileState) -> None:
    if state.mode != "train":  # serve plans compute no gradients
        return
    par = state.spec.parallelism
    zero = state.memory.zero if state.memory is not None else 0
    sizes = {"dp": par.dp, "tp": par.tp, "edp": par.edp,
             "kv": max(1, par.tp // state.spec.model.attention.n_kv_heads)}
    when = state.memory.grad_reduce if state.memory is not None else "step"
    for stage in range(len(state.stage_bounds)):
        buckets: list[GradBucket] = []
        held = [p for p in state.params.values() if owner(p, stage, par.pp, par.pipeline.schedule) == stage]
        for reduce in dict.fromkeys(tuple(p.grad_reduce) for p in held):  # edp; dp; dp, tp; dp, kv
            zero_axis = "edp" if reduce == ("edp",) else "dp"
            axes = [a for a in reduce if sizes[a] > 1 and not (zero >= 3 and a == zero_axis)]
            if not axes:
                continue
            scatter = zero == 2 and axes[0] == zero_axis
            if not scatter and axes == ["dp", "tp"]:
                axes = ["stage"]  # one all-reduce over the stage's ranks
            group = [p for p in held if tuple(p.grad_reduce) == reduce]
            current: list[Parameter] = []
            for p in reversed(group):  # backward produces gradients from the last layer first
                current.append(p)
                if sum(p.local_numel for p in current) >= BUCKET_ELEMENTS:
                    buckets.append(_bucket(axes, current, zero, scatter, when))
                    current = []
            if current:
                buckets.append(_bucket(axes, current, zero, scatter, when))
        if buckets:
            state.buckets[stage] = buckets


def _bucket(axes: list[str], params: list[Parameter], zero: int, scatter: bool, when: str) -> GradBucket:
    if scatter:  # every rank contributes every piece, padded
        padded = sum(chunk_size(p.local_numel, p.zero.parts) * p.zero.parts for p in params)
        return GradBucket("reduce_scatter", axes, [p.name for p in params], padded, when)
    elements = sum(chunk_size(p.local_numel, p.zero.parts) if zero >= 3 else p.local_numel for p in params)
    return GradBucket("all_reduce", axes, [p.name for p in params], elements)
