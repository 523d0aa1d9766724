"""The sizes and dtypes of what a program's collectives carry, per micro-batch (for the plan's
`Collective.shape` / `dtype`): b sequences of s tokens (T = b s) of width D; inside an MoE block with
tp > 1 each TP rank routes T / tp of them. With sequence parallelism a rank holds s / tp positions of
each sequence outside the TP regions (s_local)."""

from __future__ import annotations

from dataclasses import dataclass

from lcc.spec.models import Spec


@dataclass(frozen=True)
class Dims:
    b: int
    s: int
    D: int
    T: int
    T_moe: int  # tokens a rank routes in an MoE layer
    s_local: int  # positions of each sequence a rank holds between TP regions (s / tp with sequence parallelism)
    params: str  # dtype of parameters, gradients and the residual stream
    compute: str  # dtype programs compute matmuls in
    wide: str  # cross-entropy and routing: float32 or wider


def precision(spec: Spec, mode: str) -> tuple[str, str]:
    """(parameter dtype, compute dtype): bfloat16 trains from float32 master weights under autocast."""
    if mode == "serve":  # no master weights to keep: weights and activations in serve.dtype
        dtype = spec.serve.dtype if spec.serve else "bfloat16"
        return dtype, dtype
    dtype = spec.train.dtype
    return ("float32", "bfloat16") if dtype == "bfloat16" else (dtype, dtype)


def sequence_parallel(spec: Spec, mode: str) -> bool:
    """Training plans split the sequence over tp when the spec asks; serve plans never do (a decode step
    has one position per sequence)."""
    return mode == "train" and spec.parallelism.sequence_parallel and spec.parallelism.tp > 1


def dims(spec: Spec, mode: str) -> Dims:
    """Serve plans: one flat batch of tokens per step whose count varies (b 1, s and T -1, as in the plan's
    collective shapes: rows that vary per call)."""
    par, train = spec.parallelism, spec.train
    if mode == "serve":
        params, compute = precision(spec, mode)
        return Dims(1, -1, spec.model.d_model, -1, -1, -1, params, compute,
                    "float64" if params == "float64" else "float32")
    b = train.global_batch // (par.dp * par.pipeline.microbatches)
    s = train.seq_len
    params, compute = precision(spec, mode)
    s_local = s // par.tp if sequence_parallel(spec, mode) else s
    return Dims(b, s, spec.model.d_model, b * s, b * s // par.tp, s_local, params, compute,
                "float64" if params == "float64" else "float32")
