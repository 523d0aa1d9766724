"""The layouts a search considers: every assignment of the parallelism fields for a cluster of `gpus` devices.

Searched: tp (a divisor of the devices per node), pp (a divisor of gpus / tp, at most n_layers), dp = gpus /
(tp pp), ep (a divisor of dp tp), ZeRO 0-3, activation checkpointing none / selective / full, sequence
parallelism (with tp > 1), the pipeline schedule (gpipe, 1f1b, interleaved_1f1b with 2, 4 or 8 virtual
stages, and the zero-bubble zb_h1 and zbv, the latter with 2), the micro-batches (every divisor of the
sequences per dp rank), the expert exchange (flat, hierarchical) and, with ep >= 2, the overlapped exchange
(`expert_overlap`, which runs the flat exchange in two halves). Without pipeline parallelism the schedule
means nothing: one (1f1b, one virtual stage). The spec's own validation rules then decide which are valid
(a hierarchical exchange needs EP groups that span whole nodes; the overlapped one no selective
recomputation; zero-bubble schedules and 1f1b at least pp micro-batches).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from lcc.spec.models import Parallelism, Pipeline, Spec

RECOMPUTE = ("none", "selective", "full")
EXCHANGES = (("flat", False), ("hierarchical", False), ("flat", True))  # (expert_exchange, expert_overlap)
VIRTUAL = (2, 4, 8)
# --fix FIELD: the searched fields, as spec paths
FIELDS = {"parallelism.tp": "tp", "parallelism.pp": "pp", "parallelism.dp": "dp", "parallelism.ep": "ep",
          "parallelism.zero": "zero", "parallelism.activation_checkpointing": "recompute",
          "parallelism.sequence_parallel": "sp", "parallelism.pipeline.schedule": "schedule",
          "parallelism.pipeline.microbatches": "microbatches", "parallelism.pipeline.virtual_stages": "virtual_stages",
          "parallelism.expert_exchange": "exchange", "parallelism.expert_overlap": "overlap"}


@dataclass(frozen=True, order=True)
class Layout:
    tp: int
    pp: int
    dp: int
    ep: int
    zero: int
    recompute: str
    sp: bool
    schedule: str
    microbatches: int
    virtual_stages: int
    exchange: str = "flat"
    overlap: bool = False

    def parallelism(self) -> Parallelism:
        return Parallelism(tp=self.tp, pp=self.pp, dp=self.dp, ep=self.ep, zero=self.zero,
                           activation_checkpointing=self.recompute, sequence_parallel=self.sp,
                           expert_exchange=self.exchange, expert_overlap=self.overlap,
                           pipeline=Pipeline(schedule=self.schedule, microbatches=self.microbatches,
                                             virtual_stages=self.virtual_stages))

    @classmethod
    def of(cls, par: Parallelism) -> Layout:
        p = par.pipeline
        return cls(par.tp, par.pp, par.dp, par.ep, par.zero, par.activation_checkpointing, par.sequence_parallel,
                   p.schedule, p.microbatches, p.virtual_stages, par.expert_exchange, par.expert_overlap)

    def value(self, field: str) -> object:
        return getattr(self, FIELDS[field])

    def overrides(self) -> list[str]:
        """The layout as --set overrides."""
        out = []
        for field in FIELDS:
            value = self.value(field)
            out.append(f"{field}={str(value).lower() if isinstance(value, bool) else value}")
        return out


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(spec: Spec, gpus: int, per_node: int) -> Iterator[Layout]:
    """Every layout of the search space for `gpus` devices, `per_node` a node, in a fixed order."""
    n_layers, batch = spec.model.n_layers, spec.train.global_batch
    for tp in divisors(per_node):
        for pp in (p for p in divisors(gpus // tp) if p <= n_layers):
            dp = gpus // (tp * pp)
            if batch % dp:
                continue
            schedules = [("1f1b", 1)] if pp == 1 else [("gpipe", 1), ("1f1b", 1)] + [
                ("interleaved_1f1b", v) for v in VIRTUAL if pp * v <= n_layers] + [("zb_h1", 1)] + (
                [("zbv", 2)] if 2 * pp <= n_layers else [])
            for ep in divisors(dp * tp):
                exchanges = EXCHANGES if ep > 1 else EXCHANGES[:2]
                for zero in (0, 1, 2, 3):
                    for recompute in RECOMPUTE:
                        for sp in (False, True) if tp > 1 else (False,):
                            for schedule, v in schedules:
                                for m in divisors(batch // dp):
                                    for exchange, overlap in exchanges:
                                        yield Layout(tp, pp, dp, ep, zero, recompute, sp, schedule, m, v, exchange,
                                                     overlap)
