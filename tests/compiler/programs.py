"""Running compiled programs in one process (a world of one rank per role), for tests."""

from __future__ import annotations

import types

import torch

from lcc.ops import ProgramContext as Ctx


def load(text: str) -> types.ModuleType:
    module = types.ModuleType("program")
    exec(compile(text, "program.py", "exec"), module.__dict__)
    return module


def run_pipeline(files: dict[str, str], model: torch.nn.Module, spec, tokens: torch.Tensor,
                 params: dict | None = None) -> tuple[torch.Tensor, Ctx]:
    """Every stage in order on the full (unsharded) parameters: valid for tp = ep = 1."""
    params = dict(model.named_parameters()) if params is None else params
    buffers = dict(model.named_buffers())
    groups = types.SimpleNamespace(tp=None, ep=None, dp=None, edp=None)
    ctx = Ctx(spec.routing)
    x = tokens
    stages = sorted(k for k in files if k.startswith("programs/"))
    for rel in sorted(stages, key=lambda k: int(k.split("stage")[1].split(".")[0])):
        program = load(files[rel])
        x = program.forward(params, buffers, x, groups, ctx)
    return x, ctx
