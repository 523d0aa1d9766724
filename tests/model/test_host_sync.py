"""Host synchronisations of one MoE layer: at most one per micro-batch, the counts that size the expert
all-to-all (`moe_plan`).

CPU tensors record no synchronisation, so the test counts the calls that would make a GPU stream wait:
reads of a value on the host (`.tolist()`, and `_local_scalar_dense`, behind `.item()`, `int()`,
`float()`, `bool()`) and operations whose output shape depends on tensor values (boolean-mask indexing,
`nonzero`, `bincount`, `unique`, `repeat_interleave` without `output_size`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lcc import ops
from lcc.model.moe import MoEBlock, dispatch
from lcc.spec.models import MoE, Routing

aten = torch.ops.aten
READS = {aten._local_scalar_dense, aten.is_nonzero, aten.equal}
VALUE_SHAPED = {aten.nonzero, aten.masked_select, aten.bincount, aten._unique2, aten.unique_dim,
                aten.unique_consecutive}


def _bool_index(indices: Any) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class _Syncs(TorchDispatchMode):
    def __init__(self, events: list[str]):
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in READS or packet in VALUE_SHAPED:
            self.events.append(str(packet))
        elif packet in (aten.index, aten.index_put, aten.index_put_) and _bool_index(args[1]):
            self.events.append(f"{packet} (boolean mask)")
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.events.append(str(packet))
        return func(*args, **kwargs)


@contextmanager
def host_syncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Collects one entry per operation that would synchronise a GPU with the host."""
    events: list[str] = []
    tolist = torch.Tensor.tolist

    def counted(self: torch.Tensor) -> Any:
        events.append("tolist")
        return tolist(self)

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "tolist", counted)
        with _Syncs(events):
            yield events


def make_block(dtype: torch.dtype, capacity: float | None = 1.25, D: int = 16, F: int = 8) -> MoEBlock:
    """16 experts in 4 groups of 4: rows of 16 bytes in float32, so grouped matmul runs everywhere."""
    routing = Routing(groups={"top": 2, "temperature": 0.5}, k={"min": 1, "max": 4, "threshold": 0.6},
                      capacity_factor=capacity, balance={"aux_loss_coef": 0.01, "z_loss_coef": 0.001})
    block = MoEBlock(D, MoE(n_experts=16, n_groups=4, expert_d_ff=F), routing, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
        block.router.bias_E.copy_(torch.randn(16, generator=g, dtype=torch.float64) * 0.02)
    return block


def _tokens(dtype: torch.dtype, T: int = 48, D: int = 16) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(1), dtype=dtype).requires_grad_(True)


def test_counter_sees_host_reads(monkeypatch):
    x = torch.tensor([1.0, -2.0, 3.0])
    with host_syncs(monkeypatch) as events:
        x.tolist()
        int(x[0])
        x[x > 0]
        torch.bincount(torch.tensor([0, 2]))
        torch.repeat_interleave(torch.tensor([1, 2]))
        torch.repeat_interleave(torch.arange(2), torch.tensor([1, 2]), output_size=3)  # size given: no read
    assert len(events) == 5, events


def test_program_moe_layer_reads_the_host_once(monkeypatch):
    """What a compiled program runs for one MoE layer: route, the exchange plan, experts, combine."""
    block = make_block(torch.float32)
    r, ex = block.router, block.experts
    x_TD = _tokens(torch.float32)
    with host_syncs(monkeypatch) as events:
        routed = ops.route(x_TD, r.centroids_GD, r.weight_ED, r.bias_E, r.cfg)
        routed = ops.unit_balance(routed, None)
        plan = ops.moe_plan(routed, 16, None)
        y_SD = ops.grouped_swiglu(x_TD.index_select(0, plan.token_S), plan.local_counts_E, ex.w1_EFD, ex.w3_EFD,
                                  ex.w2_EDF)
        out_TD = ops.combine_tokens(y_SD, plan, x_TD)
    assert events == ["tolist"]  # moe_plan's one read of the all-to-all sizes
    assert plan.send == [sum(plan.local_counts)] and plan.local_counts == routed.load_E.long().tolist()
    (out_TD.sum() + routed.aux_loss + routed.z_loss).backward()
    assert r.weight_ED.grad.abs().sum() > 0 and ex.w1_EFD.grad.abs().sum() > 0


def test_dispatch_with_known_slot_count_reads_nothing(monkeypatch):
    block = make_block(torch.float32)
    routed = block.router(_tokens(torch.float32))
    n_slots = int(routed.mask_TK.sum())
    with host_syncs(monkeypatch) as events:
        plan = dispatch(routed, 16, n_slots=n_slots)
    assert events == [] and plan.token_S.numel() == n_slots


@pytest.mark.parametrize("capacity", [None, 1.25])
def test_reference_block_reads_the_host_once_in_float32(monkeypatch, capacity):
    block = make_block(torch.float32, capacity)
    x = _tokens(torch.float32).unsqueeze(0)
    with host_syncs(monkeypatch) as events:
        block.router(x[0])
    assert events == []  # routing: grouped matmul, counts and capacity as tensors
    with host_syncs(monkeypatch) as events:
        block(x)
    assert events == ["aten._local_scalar_dense"]  # dispatch: the number of used slots, a shape


def test_float64_loops_read_the_host(monkeypatch):
    """The documented exception: float64 (verification on a CPU) runs the group and expert loops, which
    take their sizes from the host."""
    block = make_block(torch.float64)
    x = _tokens(torch.float64)
    with host_syncs(monkeypatch) as events:
        block.router(x)
    assert events == ["tolist"]
    with host_syncs(monkeypatch) as events:
        block(x.unsqueeze(0))
    assert events == ["tolist", "aten._local_scalar_dense", "tolist"]  # router loop, dispatch, expert loop


def test_a_training_step_reads_the_host_once_per_moe_layer_and_micro_batch_and_twice_more(monkeypatch, tmp_path):
    """A rank's whole step: each MoE layer's exchange plan per micro-batch, the gradient norm (clipping
    decides on it) and one read of the step's metrics (loss, memory, every router's statistics)."""
    from lcc.compiler.output import write
    from lcc.compiler.plan import compile_plan
    from lcc.runtime.engine import RankEngine
    from lcc.spec import load_spec
    from tests.conftest import SPECS
    from tests.layouts import LAYOUTS

    spec = load_spec(SPECS / "tiny-moe.yaml", [*LAYOUTS["world1"], "parallelism.pipeline.microbatches=2",
                                               "train.seq_len=32", "train.global_batch=4"])
    write(compile_plan(spec), tmp_path / "plan")
    engine = RankEngine(tmp_path / "plan", 0)
    engine.train_step(0)
    with host_syncs(monkeypatch) as events:
        record = engine.train_step(1)
    moe_layers = len(spec.model.moe_layers)
    assert events == ["tolist"] * (2 * moe_layers) + ["aten._local_scalar_dense", "tolist"]
    assert len(record["router"]) == moe_layers and record["loss"] > 0
