"""`build_model(spec)`: the reference model, on `meta` (no memory, any size) or for real on CPU."""

from __future__ import annotations

import torch

from lcc.model import init as I
from lcc.model.transformer import Transformer
from lcc.spec.models import Spec

EXPERT_PARAMS = ("w1_EFD", "w3_EFD", "w2_EDF")
TRAIN_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.float32}


def is_expert_param(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in EXPERT_PARAMS


def init_values(spec: Spec, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                experts: range | None = None) -> torch.Tensor:
    """The initial value of parameter `name` (global name, global shape). For an expert weight, `experts`
    selects the experts to materialise (default all): the slice equals the same rows of the full tensor."""
    cfg, seed = spec.train.init, spec.seed
    leaf = name.rsplit(".", 1)[-1]
    if is_expert_param(name):
        ids = experts if experts is not None else range(shape[0])
        rows = []
        for e in ids:
            g = I.generator(seed, name, e)
            if leaf != "w2_EDF" and cfg.experts == "he_normal":
                rows.append(I.he_normal(shape[1:], shape[2], g, dtype))
            else:
                rows.append(I.normal(shape[1:], cfg.std, g, dtype))
        return torch.stack(rows) if rows else torch.empty((0, *shape[1:]), dtype=dtype)
    g = I.generator(seed, name)
    if leaf == "weight" and ("norm" in name.rsplit(".", 2)[-2]):
        return torch.ones(shape, dtype=dtype)
    if ".attn.w" in name and cfg.attention == "orthogonal":
        return I.orthogonal(shape, g, dtype)
    return I.normal(shape, cfg.std, g, dtype)


def build_model(spec: Spec, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Transformer:
    """Build and initialise the model. On `meta` nothing is allocated or initialised."""
    dtype = dtype or TRAIN_DTYPES[spec.train.dtype]
    model = Transformer(spec, device=device, dtype=dtype)
    if torch.device(device).type == "meta":
        return model
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(init_values(spec, name, tuple(p.shape), dtype))
    return model
