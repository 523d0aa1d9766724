"""Trace the reference model (on `meta`: no memory) into a torch.fx graph whose call sites are the
parts passes care about: embedding, each projection, the attention core, norms, the router, dispatch,
the experts, combine and the LM head."""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from lcc.model import build_model
from lcc.model.moe import Combiner, Dispatcher, ExpertFFN
from lcc.model.routing import Router
from lcc.model.transformer import AttentionCore, HeadRMSNorm, RMSNorm
from lcc.spec.models import Spec

LEAVES = (nn.Linear, nn.Embedding, RMSNorm, HeadRMSNorm, AttentionCore, Router, Dispatcher, ExpertFFN, Combiner)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return isinstance(m, LEAVES)


def trace(spec: Spec) -> fx.GraphModule:
    model = build_model(spec, device="meta")
    graph = _Tracer().trace(model)
    gm = fx.GraphModule(model, graph)
    gm.graph.eliminate_dead_code()
    return gm


def layer_of(target: str) -> int | None:
    """`layers.3.attn.wq` -> 3."""
    parts = target.split(".")
    return int(parts[1]) if parts[0] == "layers" and len(parts) > 1 else None
