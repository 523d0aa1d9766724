"""The decoder-only transformer a spec describes: plain PyTorch, the numerical ground truth."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lcc.model.moe import MoEBlock, SwiGLU
from lcc.spec.models import Spec


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class HeadRMSNorm(nn.Module):
    """RMSNorm of each head of a projection (B, S, heads * head_dim) over its head_dim, one weight [head_dim]
    shared by the heads: a per-head norm needs no communication when heads are split over tp."""

    def __init__(self, head_dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.head_dim, self.eps = head_dim, eps
        self.weight = nn.Parameter(torch.ones(head_dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return head_rms_norm(x, self.weight, self.head_dim, self.eps)


def head_rms_norm(x: torch.Tensor, weight: torch.Tensor, head_dim: int, eps: float) -> torch.Tensor:
    heads = x.unflatten(-1, (-1, head_dim))
    xf = heads.to(torch.promote_types(x.dtype, torch.float32))
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return normed.flatten(-2)


def qk_norms(spec: Spec, device=None, dtype=None) -> tuple[nn.Module | None, nn.Module | None]:
    """The query and key norms `model.attention.qk_norm` asks for (None, None without)."""
    m = spec.model
    att = m.attention
    if att.qk_norm == "head":
        return (HeadRMSNorm(att.head_dim, m.norm_eps, device=device, dtype=dtype),
                HeadRMSNorm(att.head_dim, m.norm_eps, device=device, dtype=dtype))
    if att.qk_norm == "all":
        return (RMSNorm(att.n_heads * att.head_dim, m.norm_eps, device=device, dtype=dtype),
                RMSNorm(att.n_kv_heads * att.head_dim, m.norm_eps, device=device, dtype=dtype))
    return None, None


def rope_tables(seq: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_at(torch.arange(seq, device=device), head_dim, theta)


def rope_at(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (float64, [len(positions), head_dim / 2]) of the rotary angles at the given positions."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = torch.outer(positions.to(torch.float64), inv)
    return angles.cos(), angles.sin()


def apply_rope(x_BHSd: torch.Tensor, cos_Sd: torch.Tensor, sin_Sd: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHSd[..., 0::2], x_BHSd[..., 1::2]
    cos, sin = cos_Sd.to(x_BHSd.dtype), sin_Sd.to(x_BHSd.dtype)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class AttentionCore(nn.Module):
    """Rotary embeddings and causal grouped-query attention on projected q, k, v (B, S, heads * head_dim)."""

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, theta: float):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim, self.theta = n_heads, n_kv_heads, head_dim, theta

    def forward(self, q_BSH: torch.Tensor, k_BSH: torch.Tensor, v_BSH: torch.Tensor,
                segments_BS: torch.Tensor | None = None) -> torch.Tensor:
        """`segments_BS`: each position's document; a position then attends only within its document."""
        B, S, _ = q_BSH.shape
        q = q_BSH.view(B, S, -1, self.head_dim).transpose(1, 2)
        k = k_BSH.view(B, S, -1, self.head_dim).transpose(1, 2)
        v = v_BSH.view(B, S, -1, self.head_dim).transpose(1, 2)
        cos, sin = rope_tables(S, self.head_dim, self.theta, device=q_BSH.device)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if segments_BS is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        else:
            same = segments_BS.unsqueeze(2) == segments_BS.unsqueeze(1)
            allowed = (same & torch.ones(S, S, dtype=torch.bool, device=same.device).tril()).unsqueeze(1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2).reshape(B, S, -1)


class Attention(nn.Module):
    def __init__(self, spec: Spec, device=None, dtype=None):
        super().__init__()
        att, d = spec.model.attention, spec.model.d_model
        self.wq = nn.Linear(d, att.n_heads * att.head_dim, bias=False, device=device, dtype=dtype)
        self.wk = nn.Linear(d, att.n_kv_heads * att.head_dim, bias=False, device=device, dtype=dtype)
        self.wv = nn.Linear(d, att.n_kv_heads * att.head_dim, bias=False, device=device, dtype=dtype)
        self.q_norm, self.k_norm = qk_norms(spec, device=device, dtype=dtype)
        self.core = AttentionCore(att.n_heads, att.n_kv_heads, att.head_dim, att.rope_theta)
        self.wo = nn.Linear(att.n_heads * att.head_dim, d, bias=False, device=device, dtype=dtype)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        q, k = self.wq(x_BSD), self.wk(x_BSD)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.wo(self.core(q, k, self.wv(x_BSD)))


class Block(nn.Module):
    def __init__(self, spec: Spec, layer: int, device=None, dtype=None):
        super().__init__()
        m = spec.model
        self.attn_norm = RMSNorm(m.d_model, m.norm_eps, device=device, dtype=dtype)
        self.attn = Attention(spec, device=device, dtype=dtype)
        self.ffn_norm = RMSNorm(m.d_model, m.norm_eps, device=device, dtype=dtype)
        if m.is_moe(layer):
            self.ffn: nn.Module = MoEBlock(m.d_model, m.moe, spec.routing, device=device, dtype=dtype)
        else:
            self.ffn = SwiGLU(m.d_model, m.ffn.d_ff, device=device, dtype=dtype)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        h = x_BSD + self.attn(self.attn_norm(x_BSD))
        return h + self.ffn(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, spec: Spec, device=None, dtype=None):
        super().__init__()
        m = spec.model
        self.embed = nn.Embedding(m.vocab_size, m.d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList(Block(spec, i, device=device, dtype=dtype) for i in range(m.n_layers))
        self.norm = RMSNorm(m.d_model, m.norm_eps, device=device, dtype=dtype)
        self.head = nn.Linear(m.d_model, m.vocab_size, bias=False, device=device, dtype=dtype)
        if m.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens_BS)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))

    def moe_blocks(self) -> list[tuple[int, MoEBlock]]:
        return [(i, b.ffn) for i, b in enumerate(self.layers) if isinstance(b.ffn, MoEBlock)]
