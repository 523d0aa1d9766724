"""Where an estimated step goes: compute, communication on the step's path, what hides behind compute, fixed
costs and the pipeline bubble, and how busy a GPU is (docs/cost-model.md, "Time").

The step is `lcc.compiler.cost.model.step_seconds`: the slowest pipeline rank's compute and the
communication it does not hide, stretched by the bubble, then what follows the pipeline. Split on those
ranks, it is exactly

    step = compute + exposed communication + fixed costs + bubble

Busy time is the share of the step a GPU runs compute kernels (its layers' rooflines: arithmetic, or weight
and gradient traffic where that is longer), averaged over all GPUs; communication kernels do not count.
MFU (`time.utilization`) counts only the model's FLOPs at the device's peak: recomputation, memory-bound
kernels and a stage left idle by a heavier one lower it, and none of them lowers busy time of the GPU that
runs them.
"""

from __future__ import annotations

from dataclasses import dataclass

from lcc.compiler.cost.model import CostModel
from lcc.compiler.layout import bubble_fraction


@dataclass(frozen=True)
class StepTime:
    seconds: float  # the step estimate (step_seconds)
    bubble: float  # the schedule's idle share
    critical: int  # the pipeline rank whose compute and communication set the pipeline's length
    compute: list[float]  # each pipeline rank's compute seconds in a step
    hidden: float  # seconds of the critical rank's communication hidden behind its compute
    exposed: float  # seconds of communication on the step's path (bandwidth; latencies are `fixed`)
    fixed: float  # fixed costs on the step's path: each collective's and message's latency
    bubble_seconds: float  # idle time the bubble adds to the critical rank

    @property
    def busy_fraction(self) -> float:
        """Share of the step a GPU computes, averaged over the GPUs."""
        return sum(self.compute) / len(self.compute) / self.seconds if self.seconds else 0.0

    @property
    def busiest_fraction(self) -> float:
        """Share of the step the busiest GPU computes."""
        return max(self.compute) / self.seconds if self.seconds else 0.0


def step_time(cm: CostModel) -> StepTime:
    par = cm.par
    pipe = par.pipeline
    bubble = bubble_fraction(par.pp, pipe.virtual_stages, pipe.microbatches, pipe.schedule)
    stretch = cm.compute_stretch  # ranks sharing a host compute faster in the pipeline's fill and drain
    seconds = [(c * stretch, i, after) for c, i, after in (cm.role_seconds(r) for r in cm.roles)]
    latency = [cm.role_latency(r) for r in cm.roles]
    k = max(range(len(seconds)), key=lambda r: (seconds[r][0] + seconds[r][1], -r))
    j = max(range(len(seconds)), key=lambda r: (seconds[r][2], -r))
    inside = seconds[k][0] + seconds[k][1]
    pipeline = inside / (1 - bubble)  # as step_seconds computes it, to the last bit
    stretch = pipeline - inside
    within = par.zero >= 2  # the reductions and the step's collectives then count inside the pipeline
    fixed_inside = latency[k][0] + (latency[k][1] if within else 0.0)
    fixed_after = 0.0 if within else latency[j][1]
    fixed = fixed_inside + fixed_after
    exposed = seconds[k][1] - fixed_inside + seconds[j][2] - fixed_after
    return StepTime(pipeline + seconds[j][2], bubble, k, [s[0] for s in seconds],
                    cm.role_hidden(cm.roles[k]), exposed, fixed, stretch)
