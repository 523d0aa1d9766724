"""Where each lcc parameter lives in a Hugging Face checkpoint of a supported family, and how its values move.

Two things differ besides names:
- experts: lcc stacks a layer's experts (`w1_EFD`, `w3_EFD`, `w2_EDF`); checkpoints hold one tensor per expert
  (`experts.<e>.gate_proj.weight`, Mixtral's `w1`/`w3`/`w2`), or, as transformers 5 holds them, fused stacks
  (`experts.gate_up_proj` [E, 2F, D], gate rows first, and `experts.down_proj` [E, D, F]);
- rotary embeddings: transformers rotates dimension j with j + head_dim/2 of each head, lcc rotates
  neighbours 2j and 2j+1. Permuting each head's rows of the query and key projections (and their norms'
  weights) maps one onto the other exactly: attention scores are unchanged by a permutation applied to
  both queries and keys, and RMSNorm's mean square is too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def rope_order(head_dim: int) -> torch.Tensor:
    """lcc's head dimension i holds transformers' dimension rope_order[i]: (0, h, 1, h+1, ...), h = head_dim/2."""
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)


def to_lcc_heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows (dim 0) of whole heads, reordered from transformers' rotary layout to lcc's."""
    return t.unflatten(0, (-1, head_dim))[:, rope_order(head_dim)].flatten(0, 1)


def to_hf_heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    return t.unflatten(0, (-1, head_dim))[:, torch.argsort(rope_order(head_dim))].flatten(0, 1)


@dataclass(frozen=True)
class Part:
    """Where (part of) an lcc parameter comes from: checkpoint tensor `name`, optionally its `index` along dim
    0 (a fused stack's expert) and rows [rows[0], rows[1]) of what that gives (gate or up of gate_up_proj);
    `heads`: reorder rows per head of this head_dim (rotary layout); placed at `offset` of the lcc tensor."""

    name: str
    offset: tuple[int, ...]
    index: int | None = None
    rows: tuple[int, int] | None = None
    heads: int | None = None


def moe_prefix(family: str, layer: int) -> str:
    return f"model.layers.{layer}.{'block_sparse_moe' if family == 'mixtral' else 'mlp'}"


EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
                "olmoe": ("gate_proj", "up_proj", "down_proj")}


def dense_names(family: str, name: str, qk_norm: str, head_dim: int, tied: bool) -> list[Part] | None:
    """The parts of a parameter that is not an expert stack (None for a router's centroids: lcc's own)."""
    if name == "embed.weight":
        return [Part("model.embed_tokens.weight", (0, 0))]
    if name == "head.weight":
        return [Part("lm_head.weight", (0, 0))] if not tied else None
    if name == "norm.weight":
        return [Part("model.norm.weight", (0,))]
    parts = name.split(".")
    layer, rest = int(parts[1]), ".".join(parts[2:])
    base = f"model.layers.{layer}"
    attn = {"attn.wq.weight": ("self_attn.q_proj.weight", head_dim), "attn.wk.weight": ("self_attn.k_proj.weight",
                                                                                         head_dim),
            "attn.wv.weight": ("self_attn.v_proj.weight", None), "attn.wo.weight": ("self_attn.o_proj.weight", None),
            "attn_norm.weight": ("input_layernorm.weight", None),
            "ffn_norm.weight": ("post_attention_layernorm.weight", None),
            "ffn.w1.weight": ("mlp.gate_proj.weight", None), "ffn.w3.weight": ("mlp.up_proj.weight", None),
            "ffn.w2.weight": ("mlp.down_proj.weight", None)}
    if rest in attn:
        hf, heads = attn[rest]
        return [Part(f"{base}.{hf}", (0,) * (1 if "norm" in rest else 2), heads=heads)]
    if rest in ("attn.q_norm.weight", "attn.k_norm.weight"):
        hf = f"{base}.self_attn.{rest.split('.')[1]}.weight"
        return [Part(hf, (0,), heads=head_dim)]  # per head: the head_dim weight itself; all: every head's slice
    if rest == "ffn.router.weight_ED":
        return [Part(f"{moe_prefix(family, layer)}.gate.weight", (0, 0))]
    if rest == "ffn.router.centroids_GD":
        return None
    raise KeyError(name)


def expert_parts(family: str, name: str, n_experts: int, d_ff: int, fused: bool) -> list[Part]:
    """The parts of an expert stack: one per expert, from per-expert tensors or from the fused stacks."""
    parts = name.split(".")
    layer, leaf = int(parts[1]), parts[-1]
    which = {"w1_EFD": 0, "w3_EFD": 1, "w2_EDF": 2}[leaf]
    out = []
    for e in range(n_experts):
        offset = (e, 0, 0)
        if not fused:
            out.append(Part(f"{moe_prefix(family, layer)}.experts.{e}.{EXPERT_NAMES[family][which]}.weight", offset))
        elif which == 2:
            out.append(Part(f"{fused_prefix(layer)}.down_proj", offset, index=e))
        else:
            rows = (0, d_ff) if which == 0 else (d_ff, 2 * d_ff)
            out.append(Part(f"{fused_prefix(layer)}.gate_up_proj", offset, index=e, rows=rows))
    return out


def fused_prefix(layer: int) -> str:
    return f"model.layers.{layer}.mlp.experts"
