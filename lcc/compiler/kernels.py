"""What runs each part of a serve plan's step (the plan's `serving.*_kernel` fields), from the spec alone:
lcc's native CPU kernels, PyTorch's, the Triton kernels on CUDA, or the reference ops for float64."""

from __future__ import annotations

from lcc.spec.models import Spec


def expert_kernel(spec: Spec) -> str:
    """How a serve plan's experts run (plan.serving.expert_kernel)."""
    quant = spec.quantization.experts if spec.quantization is not None and spec.model.moe is not None else None
    if spec.serve.dtype == "float64" or spec.model.moe is None:
        return "dense" if quant is None else "int4_reference"
    if spec.cluster.device.kind == "cuda":
        return "dense_triton" if quant is None else "int4_triton"
    if quant is None:
        return "dense"
    return "int4_native_cpu" if native_cpu(spec) else "int4_packed_cpu"


def native_cpu(spec: Spec) -> bool:
    """lcc's native CPU kernels serve the step where serve.cpu_kernels asks for them: bfloat16 or float32 on
    CPU (float64 verifies against the reference ops, CUDA runs Triton)."""
    return spec.cluster.device.kind == "cpu" and spec.serve.dtype != "float64" and spec.serve.cpu_kernels == "native"


def attention_kernel(spec: Spec) -> str:
    """What runs a serve plan's rotary embeddings, cache writes and decode attention
    (plan.serving.attention_kernel): lcc's native CPU kernels (head_dim a multiple of 16), else PyTorch."""
    return "native_cpu" if native_cpu(spec) and spec.model.attention.head_dim % 16 == 0 else "torch"


def routing_kernel(spec: Spec) -> str:
    """What decides a serve plan's routing from its tables (plan.serving.routing_kernel)."""
    native = native_cpu(spec) and spec.serve.routing_tables and spec.model.moe is not None
    # lcc's native router keeps every set of groups: node-limited routing runs in PyTorch
    return "native_cpu" if native and not spec.routing.groups.node_limited else "torch"


def dense_kernel(spec: Spec) -> str:
    """What runs a serve plan's dense projections (plan.serving.dense_kernel): lcc's native CPU kernel for
    bfloat16 serving (float32 stays on PyTorch's matmul, which reads float32 weights as fast), else PyTorch."""
    return "native_cpu" if native_cpu(spec) and spec.serve.dtype == "bfloat16" else "torch"


def norm_kernel(spec: Spec) -> str:
    """What runs a serve plan's RMS norms (plan.serving.norm_kernel): lcc's native CPU kernel, else PyTorch."""
    return "native_cpu" if native_cpu(spec) else "torch"


def decode_kernel(spec: Spec) -> str:
    """What runs the MoE layers of a step of decode tokens only (plan.serving.decode_kernel): `native_cpu`, each
    layer one call of lcc's native kernels (`ops.decode_layer` in the programs' `decode_forward`), where every
    part of such a layer runs in them and nothing is exchanged inside it: bfloat16 on CPU, int4 experts on the
    native kernel or unquantised ones on the dense kernel, routing tables, no tensor or expert parallelism, no
    shared experts, no query and key norm over all heads; else `ops` (the layer's lines one by one, as
    `forward`)."""
    moe, par = spec.model.moe, spec.parallelism
    fused = (native_cpu(spec) and spec.serve.dtype == "bfloat16" and moe is not None and moe.n_shared_experts == 0
             and expert_kernel(spec) in ("int4_native_cpu", "dense") and attention_kernel(spec) == "native_cpu"
             and routing_kernel(spec) == "native_cpu" and par.tp == 1 and par.ep == 1
             and spec.model.attention.qk_norm in ("none", "head"))
    return "native_cpu" if fused else "ops"
