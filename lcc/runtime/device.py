"""Where a rank's tensors live, from the plan (`cluster.device.kind`): the CPU with gloo process groups, or
for CUDA plans the rank's own GPU (`cuda:<local rank>`) with NCCL.

`check_device` runs in the launcher before any rank starts: a CUDA plan on a machine without enough GPUs
(or, for serve plans whose experts run on the Triton kernels, without Triton) is refused with one
message, never run on the CPU instead. `join` is each rank's first step: bind the device, keep TF32 off
unless the spec allows it, and join the process group.

A rank builds its weights on the CPU (the deterministic initialisation and checkpoint reads are the
same bits on every device) and moves them to its device once; its steps then run under the device as
torch's default, so that every buffer a step creates is on the GPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch

from lcc.plan import read_plan
from lcc.plan.types import Plan
from lcc.runtime.preflight import LaunchRefused
from lcc.runtime.rendezvous import join_group


def check_device(plan: Plan, ranks_here: int | None = None) -> None:
    """`ranks_here`: the plan's ranks on this machine, one GPU each (default: under torchrun
    LOCAL_WORLD_SIZE, else all of them)."""
    if ranks_here is None:
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", plan.world_size))
    if plan.device != "cuda":
        return
    where = "cluster.device.kind: cuda"
    if not torch.cuda.is_available():
        raise LaunchRefused(f"the plan runs on CUDA GPUs ({where}) and this machine has none that torch can use "
                            f"(torch {torch.__version__}, torch.cuda.is_available() is False); compile the spec "
                            "with cluster.device.kind: cpu to run it here")
    have = torch.cuda.device_count()
    if have < ranks_here:
        raise LaunchRefused(f"the plan starts {ranks_here} ranks of one GPU each on this machine ({where}); it has "
                            f"{have} GPU{'s' if have != 1 else ''}")
    if plan.backend == "triton":
        from lcc.backends.triton import available

        why = available()
        if why is not None:
            raise LaunchRefused(f"the plan's experts run on the Triton kernels (backend triton): {why}")


def slow_bfloat16(plan: Plan) -> str | None:
    """A warning where a CPU plan computes in bfloat16 on a CPU without bfloat16 matrix instructions
    (AVX512-BF16 or AMX, as oneDNN reports them): its matmuls then run far slower than in float32 (measured
    87x for a 2048 x 512 x 512 matmul on an AMD EPYC with AVX2, docs/runtime.md). None otherwise."""
    if plan.device != "cpu" or plan.dtype != "bfloat16":
        return None
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: nothing to say
        return None
    if native:
        return None
    field = "serve.dtype" if plan.mode == "serve" else "train.dtype"
    return (f"warning: the plan computes in bfloat16 ({field}) and this CPU has no bfloat16 matrix instructions "
            f"(PyTorch's CPU capability: {torch.backends.cpu.get_cpu_capability()}): its bfloat16 matmuls run far "
            f"slower than float32 ones; --set {field}=float32 runs faster here")


def warn_slow_bfloat16(plan: Plan) -> None:
    note = slow_bfloat16(plan)
    if note is not None:
        print(note, file=sys.stderr, flush=True)


def bind(plan: Plan, local_rank: int, allow_tf32: bool = False) -> torch.device:
    """This rank's device; for CUDA it becomes the current device, with TF32 as the spec says."""
    if plan.device != "cuda":
        return torch.device("cpu")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    return device


def join(plan: Plan, rank: int, world: int, timeout_s: float, allow_tf32: bool = False,
         port: int | None = None) -> torch.device:
    """Bind this rank's device and join the process group, through the launcher's store on `port`
    (lcc.runtime.rendezvous), or without one through torchrun's. Its GPU is its local rank: under torchrun
    LOCAL_RANK, else its rank (lcc starts every rank on this machine)."""
    device = bind(plan, int(os.environ.get("LOCAL_RANK", rank)), allow_tf32)
    if world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        join_group(backend, rank, world, timeout_s, port, device_id=device if device.type == "cuda" else None)
    return device


def running_on(device: torch.device) -> contextlib.AbstractContextManager:
    """A step's tensors on `device` (factory calls without a device), which is also the current CUDA device
    (the serving engine steps in a thread of its own); nothing to do on the CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.cuda.device(device))
    stack.enter_context(device)
    return stack


def join_plan(plan_dir: str | Path, rank: int, world: int, timeout_s: float, port: int | None = None) -> torch.device:
    """`join` for the plan in `plan_dir` (its spec says whether TF32 is allowed)."""
    plan = read_plan(Path(plan_dir))
    spec = json.loads((Path(plan_dir) / "spec.json").read_text())
    return join(plan, rank, world, timeout_s, bool(spec["cluster"]["device"].get("tf32", False)), port)
