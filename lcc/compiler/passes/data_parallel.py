"""Data parallelism: gradient reduction over dp (dense) and edp (experts), in buckets, per stage."""

from __future__ import annotations

from lcc.compiler.state import CompileState

NAME = "data_parallel"
DESCRIPTION = "bucketed gradient reduction: dense parameters over dp, expert parameters over edp"

BUCKET_ELEMENTS = 25_000_000  # per-rank elements per bucket (shards, not global sizes)


def local_numel(shape: tuple[int, ...], shard: dict | None) -> int:
    n = 1
    for i, size in enumerate(shape):
        n *= size // shard["parts"] if shard is not None and shard["dim"] == i else size
    return n


def run(state: CompileState) -> None:
    par = state.spec.parallelism
    zero = par.zero if state.mode == "train" else 0
    op = "reduce_scatter" if zero >= 2 else "all_reduce"
    buckets: dict[int, list[dict]] = {}
    for stage in range(len(state.stage_bounds)):
        for axes, expert in ((("edp",), True), (("dp",), False), (("dp", "tp"), False)):
            names = [n for n, p in state.params.items()
                     if stage in p.stages and p.expert == expert and tuple(p.grad_reduce) == axes]
            if zero >= 3:  # the programs reduce-scatter over dp / edp in backward; what is left is tp
                axes = tuple(a for a in axes if a not in ("dp", "edp"))
                if not axes:
                    continue
            current: list[str] = []
            size = 0
            for name in reversed(names):  # backward produces gradients from the last layer first
                current.append(name)
                size += local_numel(state.params[name].shape, state.params[name].shard)
                if size >= BUCKET_ELEMENTS:
                    buckets.setdefault(stage, []).append(_bucket(op, axes, current, size))
                    current, size = [], 0
            if current:
                buckets.setdefault(stage, []).append(_bucket(op, axes, current, size))
    state.plan["grad_buckets"] = {str(s): b for s, b in sorted(buckets.items())}


def _bucket(op: str, axes: tuple[str, ...], params: list[str], elements: int) -> dict:
    return {"op": op if "dp" in axes or "edp" in axes else "all_reduce", "axes": list(axes), "params": params,
            "elements": elements}
