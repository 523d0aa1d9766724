"""Quantization (serve plans): expert weights stored as packed int4 with float16 scales per group."""

from __future__ import annotations

from lcc.compiler.state import CompileState
from lcc.plan.types import ServeFormat

NAME = "quantize"
DESCRIPTION = "serve plans: expert weights become int4 (two per byte) + fp16 scales (+ uint8 zero-points)"


def run(state: CompileState) -> None:
    quant = state.spec.quantization.experts if state.spec.quantization is not None else None
    if state.mode != "serve" or quant is None:
        return
    for info in state.params.values():
        if not info.expert:
            continue
        *lead, n_in = info.global_shape
        groups = n_in // quant.group_size
        info.serve = ServeFormat(f"int{quant.bits}", [*lead, n_in // 2], "uint8", [*lead, groups], "float16",
                                 None if quant.symmetric else [*lead, groups])
