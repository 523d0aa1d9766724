"""The reference model: plain PyTorch, the numerical ground truth for every compiled plan."""

from lcc.model.build import build_model, init_values
from lcc.model.transformer import Transformer

__all__ = ["Transformer", "build_model", "init_values"]
