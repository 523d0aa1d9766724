"""A serving rank's weights: its shards of a `lcc run train` checkpoint saved under any layout (or the
deterministic initialisation), experts quantised to int4 as the spec asks and prepared for the plan's
expert kernel, everything else in `serve.dtype`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from lcc.backends.cpu import dense as native_dense
from lcc.backends.cpu import int4_native as native_int4
from lcc.backends.cpu import norm as native_norm
from lcc.backends.cpu.int4 import PackedInt4, pack, pack_gate_up
from lcc.backends.cpu.int4_native import NativeInt4
from lcc.backends.torch_ref.int4 import Int4Weight, quantize
from lcc.backends.triton.experts import ExpertStack
from lcc.plan.types import Plan
from lcc.runtime import checkpoint
from lcc.runtime.checkpoint_layout import local_blocks, origin
from lcc.runtime.checkpoint_verify import check_checkpoint  # noqa: F401 - serving's name for it
from lcc.runtime.shards import local_parameters
from lcc.spec.models import Spec

# The weights the programs only multiply with `ops.linear` or look up with `ops.embedding_shard` (which takes
# them held as they are): what the plan's `serving.dense_kernel` runs, the embedding for a tied head
LINEAR_ONLY = re.compile(r"(\.attn\.w[qkvo]|\.ffn\.(shared\.)?w[123]|^head|^embed)\.weight$")

# RMS norms' weights (of the width, and of each query or key head): what the plan's `serving.norm_kernel` runs
NORMS = re.compile(r"norm\.weight$")

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def _saved_dtype(ident: dict[str, Any]) -> torch.dtype:
    """Checkpoints hold float32 master weights for float32 and bfloat16 training, float64 for float64."""
    return torch.float64 if ident["spec"]["train"]["dtype"] == "float64" else torch.float32


Tensors = dict[str, torch.Tensor]


def load_shards(spec: Spec, plan: Plan, coords: dict[str, int], sizes: dict[str, int],
                folder: Path | None, ident: dict[str, Any] | None) -> tuple[Tensors, Tensors]:
    """This rank's parameter shards and buffers in the dtype they were saved (or initialised) in."""
    stages = {r.stage for r in plan.roles_of(coords["pp"])}
    buffers = {b.name: torch.zeros(b.shape, dtype=DTYPES[b.dtype]) for b in plan.buffers if set(b.stages) & stages}
    if folder is None:  # as lcc.build_model initialises in the serve dtype (float32 for bfloat16)
        dtype = torch.float64 if plan.serving.dtype == "float64" else torch.float32
        params = {n: p.detach() for n, p in local_parameters(spec, plan, coords, sizes, dtype).items()}
        return params, buffers
    dtype = _saved_dtype(ident)
    params = {p.name: torch.empty(p.local_shape, dtype=dtype) for p in plan.parameters if stages & set(p.stages)}
    state: dict[str, Any] = {f"model/{n}": local_blocks(plan.parameter(n), origin(plan.parameter(n), coords, sizes), t)
                             for n, t in params.items()}
    state.update({f"bias/{n}": b for n, b in buffers.items()})
    checkpoint.load(folder, state)
    return params, buffers


def serving_weights(spec: Spec, plan: Plan, params: dict[str, torch.Tensor],
                    device: torch.device | None = None) -> dict[str, Any]:
    """The programs' P on `device`: dense weights in the serve dtype; experts int4 (packed for the CPU
    kernel, as lcc's reference int4 weights, or those in stacks for the Triton kernels) or, unquantised, in
    the serve dtype (in stacks for the Triton kernels)."""
    serving = plan.serving
    dtype = DTYPES[serving.dtype]
    device = device if device is not None else torch.device("cpu")
    quant = spec.quantization.experts if spec.quantization is not None else None
    kernel = serving.expert_kernel

    def int4(t: torch.Tensor) -> Int4Weight:
        return _to(quantize(t, quant.group_size, quant.symmetric), device)

    def cpu_pack(q: Int4Weight, up: Int4Weight | None = None) -> PackedInt4 | NativeInt4:
        if kernel == "int4_native_cpu":
            return native_int4.pack(q) if up is None else native_int4.pack_gate_up(q, up)
        return pack(q, dtype) if up is None else pack_gate_up(q, up, dtype)

    out: dict[str, Any] = {}
    for name, t in params.items():
        if serving.norm_kernel == "native_cpu" and NORMS.search(name):
            out[name] = native_norm.prepare(t, dtype)
        elif serving.dense_kernel == "native_cpu" and LINEAR_ONLY.search(name):
            out[name] = native_dense.prepare(t)
        elif serving.dense_kernel == "native_cpu" and kernel == "dense" and plan.parameter(name).expert:
            out[name] = native_dense.prepare_experts(t)  # unquantised experts: ops.grouped_swiglu
        elif not plan.parameter(name).expert or kernel == "dense":
            out[name] = t.to(device=device, dtype=dtype)
        elif kernel == "dense_triton":
            out[name] = ExpertStack(t.to(device=device, dtype=dtype).contiguous())
        elif kernel == "int4_reference":
            out[name] = int4(t)
        elif kernel == "int4_triton":
            out[name] = ExpertStack(int4(t))
        elif name.endswith(".w2_EDF"):  # the CPU kernels: lcc's native one, or PyTorch's packed int4 matmul
            out[name] = cpu_pack(quantize(t, quant.group_size, quant.symmetric))
        elif name.endswith(".w1_EFD"):  # gate and up in one packed weight: one kernel call for both
            w3 = name.replace(".w1_EFD", ".w3_EFD")
            out[name] = out[w3] = cpu_pack(quantize(t, quant.group_size, quant.symmetric),
                                           quantize(params[w3], quant.group_size, quant.symmetric))
    return out


def _to(q: Int4Weight, device: torch.device) -> Int4Weight:
    if device.type == "cpu":
        return q
    return Int4Weight(q.packed.to(device), q.scales.to(device), None if q.zeros is None else q.zeros.to(device),
                      q.group_size, q.shape)


def weight_bytes(weights: dict[str, Any]) -> int:
    """Bytes of the distinct tensors (w1 and w3 may share one packed weight)."""
    distinct = {id(w): w for w in weights.values()}.values()
    return sum(w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes for w in distinct)


def spec_of(plan_dir: Path) -> dict[str, Any]:
    return json.loads((Path(plan_dir) / "spec.json").read_text())
