"""`train.compile: inductor`: the program functions the plan compiles, wrapped with torch.compile.

Each role's `compiled` functions (its layers) are compiled on their first call. Inside them, every op the
op table does not trace (`lcc.plan.op_table.untraced`: collectives, ZeRO-3 gathers, recomputation and
the experts, whose segments are sized by the routing) runs eagerly, called through torch.compiler's
`disable`: a compiled region ends before it and the next begins after it, so every collective is issued
exactly as the program's line says (`ProgramContext.observe` is disabled where it is defined).
Inductor's graph cache keys each region on its graph and inputs, so a changed program recompiles and an
unchanged one is read from the cache (`cache_dir`).
"""

from __future__ import annotations

import os
import shutil
import types
from pathlib import Path

import torch

from lcc import ops
from lcc.plan.op_table import untraced
from lcc.plan.types import Role


class CompileUnavailable(RuntimeError):
    """The plan compiles functions and this machine cannot (no C++ compiler for Inductor on CPU)."""


def cxx_compiler() -> str | None:
    """The C++ compiler Inductor's CPU code would use: $CXX, else c++ / g++ / clang++ on PATH."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    return next((shutil.which(n) for n in names if shutil.which(n)), None)


def check_compile(roles: list[Role], device: str) -> None:
    """Before launch: a plan that compiles on CPU needs a C++ compiler (GPUs compile Triton)."""
    if device == "cpu" and any(r.compiled for r in roles) and cxx_compiler() is None:
        raise CompileUnavailable(
            "the plan compiles its layers with torch.compile (train.compile: inductor), which on CPU needs a C++ "
            "compiler, and none was found ($CXX, c++, g++, clang++): install one (apt install g++), or compile "
            "the plan with --set train.compile=none")


def _boundaries() -> types.SimpleNamespace:
    """lcc.ops as the compiled functions see it: the untraced ops behind torch.compiler.disable."""
    names = {n for n in dir(ops) if not n.startswith("_")}
    wrapped = {n: getattr(ops, n) for n in names}
    for name in untraced():
        wrapped[name] = torch.compiler.disable(getattr(ops, name), recursive=True)
    return types.SimpleNamespace(**wrapped)


def cache_dir() -> Path:
    """Inductor's cache: $TORCHINDUCTOR_CACHE_DIR, else ~/.cache/lcc/inductor ($XDG_CACHE_HOME/lcc/inductor)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lcc" / "inductor"


def prepare_inductor() -> None:
    """Inductor as a rank process uses it: its cache in `cache_dir`, compiling in the process itself."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir())
    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        # in the rank's process: a layer's regions are small, and starting Inductor's pool of compile workers
        # cost more than it saved (tiny-moe on 2 cores: 48 s against 17 s for a test's two runs)
        import torch._inductor.config

        torch._inductor.config.compile_threads = 1


def compile_programs(programs: dict[int, types.ModuleType], roles: dict[int, Role]) -> None:
    """Replace each role's compiled functions in its program module by their torch.compile wrappers (the
    module's other functions call them by name, so `forward` runs the compiled ones)."""
    if not any(roles[s].compiled for s in programs):
        return
    prepare_inductor()
    boundaries = _boundaries()
    for stage, module in programs.items():
        if not roles[stage].compiled:
            continue
        module.ops = boundaries
        for name in roles[stage].compiled:
            setattr(module, name, torch.compile(getattr(module, name), backend="inductor"))


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far (Dynamo's trace and Inductor's forward and backward
    code generation, as torch records them; 0 where it records nothing)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return 0.0
    return sum(sum(v) for k, v in compilation_time_metrics.items()
               if k in ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler"))
