"""`cluster.calibration`: the achieved rates `lcc calibrate` measured, by operation class and size, that the cost
model interpolates instead of the datasheet's peaks (docs/cost-model.md, "Calibration").

Each compute row is its shape, the forward's median seconds, then the forward and backward's seconds:
median, 10th and 90th percentile over every rank's batches of calls. Element-wise, optimizer and collective
rows are their size, then the same three figures; a collective's row begins with its group's size.
`concurrency` times one reference workload with 1, 2, ... of the ranks computing at once (the others idle):
where ranks share a host's cores, as CPU ranks do, fewer busy ranks compute faster, and a pipeline's fill and
drain run at those rates. Without it, every rank computes at the rate measured with all of them busy.
`compiled` times the traced part of a reference layer (its norms, attention block, dense SwiGLU and residuals:
what `train.compile: inductor` compiles) eager and under torch.compile, by tokens: a compiled plan's layers are
priced at that ratio. Without it, a compiled plan is priced as eager.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Seconds = Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)]
Size = Annotated[float, Field(gt=0, le=1e18, allow_inf_nan=False)]
Spread = tuple[Seconds, Seconds, Seconds]
Group = Annotated[int, Field(gt=1, le=1 << 20)]
Collective = Literal["all_reduce", "all_to_all", "all_gather", "reduce_scatter", "send_recv"]


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ranks: Annotated[int, Field(gt=0, le=1 << 20)] = Field(description="Ranks that measured at once.")
    threads_per_rank: Annotated[int, Field(gt=0, le=1 << 16)] = 1
    dtype: Literal["float32", "bfloat16", "float64"] = Field("float32", description="The compute dtype measured.")
    linear: tuple[tuple[Size, Size, Size, Seconds, Seconds, Seconds, Seconds], ...] = Field(
        description="[rows, inner, outer, forward s, forward and backward s: median, fast, slow]")
    experts: tuple[tuple[Size, Size, Size, Size, Seconds, Seconds, Seconds, Seconds], ...] = Field(
        description="Grouped SwiGLU: [experts, rows per expert, d_model, d_ff, forward s, forward and backward s: "
                    "median, fast, slow]")
    attention: tuple[tuple[Size, Size, Size, Seconds, Seconds, Seconds, Seconds], ...] = Field(
        description="Causal attention of one sequence: [heads, seq, head_dim, forward s, forward and backward s: "
                    "median, fast, slow]")
    elementwise: tuple[tuple[Size, Seconds, Seconds, Seconds], ...] = Field(
        description="[bytes moved, seconds: median, fast, slow]")
    optimizer: tuple[tuple[Size, Seconds, Seconds, Seconds], ...] = Field(
        description="Gradient norm and AdamW step: [parameters, seconds: median, fast, slow]")
    op_seconds: Spread = Field(description="One small operation, forward and backward: median, fast, slow.")
    concurrency: tuple[tuple[Annotated[int, Field(gt=0, le=1 << 20)], Seconds, Seconds, Seconds], ...] = Field(
        (), description="[ranks computing at once, seconds of the reference workload: median, fast, slow]")
    compiled: tuple[tuple[Size, Seconds, Seconds, Seconds, Seconds], ...] = Field(
        (), description="A reference layer's traced part, forward and backward: [tokens, eager s (median), under "
                        "torch.compile (Inductor) s: median, fast, slow]")
    collectives: dict[Collective, tuple[tuple[Group, Size, Seconds, Seconds, Seconds], ...]] = Field(
        default_factory=dict, description="By kind: [group size, bytes per rank, seconds: median, fast, slow]")

    @model_validator(mode="after")
    def _filled(self) -> Calibration:
        for name in ("linear", "experts", "attention", "elementwise", "optimizer"):
            if not getattr(self, name):
                raise ValueError(f"{name}: at least one measured point")
        busy = [row[0] for row in self.concurrency]
        if busy and (busy != sorted(set(busy)) or busy[-1] != self.ranks):
            raise ValueError(f"concurrency: rows by ranks computing at once, ascending, the last at all {self.ranks}"
                             f" ranks (got {busy})")
        tokens = [row[0] for row in self.compiled]
        if tokens != sorted(set(tokens)):
            raise ValueError(f"compiled: rows by tokens, ascending (got {tokens})")
        return self
