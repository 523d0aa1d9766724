"""The oracle of serving: the reference model (lcc.build_model) with the same int4 experts, generating
greedily without a cache (the whole sequence recomputed for every token), in float64."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from lcc.model import build_model
from lcc.model.quantized import quantize_experts
from lcc.spec import Spec

_CACHE: dict[tuple, list[int]] = {}


def reference_model(spec: Spec, checkpoint: Path | None = None) -> torch.nn.Module:
    """float64; weights from the deterministic initialisation, or a checkpoint loaded by DCP into whole
    tensors (its keys: model/<parameter>, bias/<buffer>)."""
    model = build_model(spec, dtype=torch.float32 if checkpoint else torch.float64)
    if checkpoint is not None:
        model = load_checkpoint(model, checkpoint).to(torch.float64)
    if spec.quantization is not None and spec.quantization.experts is not None:
        quantize_experts(model, spec.quantization.experts)  # from the float32 values, as serving does
    return model.eval()


def load_checkpoint(model: torch.nn.Module, checkpoint: Path) -> torch.nn.Module:
    """`model` with the parameters and buffers of a checkpoint, read by DCP into whole tensors (its keys:
    model/<parameter>, bias/<buffer>), in the model's dtype."""
    state = {f"model/{n}": p.detach().clone() for n, p in model.named_parameters()}
    state.update({f"bias/{n}": b.clone() for n, b in model.named_buffers()})
    with warnings.catch_warnings():  # a single process is meant
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state[f"model/{n}"])
        for n, b in model.named_buffers():
            b.copy_(state[f"bias/{n}"])
    return model


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: list[int], n: int, key: tuple | None = None) -> list[int]:
    if key is not None and (key, tuple(prompt), n) in _CACHE:
        return _CACHE[(key, tuple(prompt), n)]
    tokens = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([tokens]))[0, -1]
        tokens.append(int(torch.argmax(logits)))
    out = tokens[len(prompt):]
    if key is not None:
        _CACHE[(key, tuple(prompt), n)] = out
    return out
