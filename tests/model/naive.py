"""Deliberately naive test oracles: routing + MoE per token and per expert in Python, and AdamW in plain
tensor arithmetic from its equations."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def naive_moe(block, x_TD: torch.Tensor):
    r, cfg = block.router, block.router.cfg
    G, P, E = r.n_groups, r.per_group, r.n_experts
    T = x_TD.shape[0]
    chosen = []  # per token: list of (expert, gate)
    pis, lse = torch.zeros(T, E, dtype=x_TD.dtype), []  # joint probabilities; logsumexp of kept logits
    for t in range(T):
        x = x_TD[t]
        aff = [F.cosine_similarity(x, r.centroids_GD[g], dim=0) / cfg.groups.temperature for g in range(G)]
        allowed = range(G)
        if cfg.groups.max_sets is not None:  # node-limited: the best max_sets sets by their best group
            per_set = G // cfg.groups.sets
            best = [max(float(aff[g]) for g in range(s * per_set, (s + 1) * per_set)) for s in range(cfg.groups.sets)]
            sets = sorted(range(cfg.groups.sets), key=lambda s: (-best[s], s))[: cfg.groups.max_sets]
            allowed = [g for g in range(G) if g // per_set in sets]
        kept = sorted(sorted(allowed, key=lambda g: (-float(aff[g]), g))[: cfg.groups.top])
        q = torch.softmax(torch.stack([aff[g] for g in kept]), 0)
        cands, logits = [], []
        for gi, g in enumerate(kept):
            z = torch.stack([r.weight_ED[g * P + j] @ x for j in range(P)])
            logits.append(z)
            p = torch.softmax(z, 0) if cfg.score == "softmax" else torch.sigmoid(z) / torch.sigmoid(z).sum()
            cands += [(g * P + j, q[gi] * p[j]) for j in range(P)]
        lse.append(torch.logsumexp(torch.cat(logits), 0))
        for e, pi in cands:
            pis[t, e] = pi.detach()
        bias = cfg.experts.selection == "least_loaded"
        ranked = sorted(cands, key=lambda c: (-(float(c[1]) + (float(r.bias_E[c[0]]) if bias else 0.0)), c[0]))
        k, mass = None, 0.0
        for i, (_, pi) in enumerate(ranked[: cfg.k.max]):
            mass += float(pi)
            if mass >= cfg.k.threshold:
                k = i + 1
                break
        k = min(max(k or cfg.k.max, cfg.k.min), cfg.k.max)
        picked = ranked[:k]
        gates = [pi for _, pi in picked]
        if cfg.renormalize:
            total = sum(gates)
            gates = [g / total for g in gates]
        gates = [cfg.gate_scale * g for g in gates]
        chosen.append([(e, g) for (e, _), g in zip(picked, gates, strict=True)])
    if cfg.capacity_factor is not None:
        used = sum(len(c) for c in chosen)
        cap = math.ceil(cfg.capacity_factor * used / E)
        seen = [0] * E
        keep = [[False] * len(c) for c in chosen]
        for slot in range(cfg.k.max):
            for t in range(T):
                if slot < len(chosen[t]):
                    e = chosen[t][slot][0]
                    seen[e] += 1
                    keep[t][slot] = seen[e] <= cap
        chosen = [[c for c, kp in zip(cs, ks, strict=True) if kp] for cs, ks in zip(chosen, keep, strict=True)]
    ex = block.experts
    out = []
    for t in range(T):
        x = x_TD[t]
        y = torch.zeros_like(x)
        for e, g in chosen[t]:
            h = F.silu(ex.w1_EFD[e] @ x) * (ex.w3_EFD[e] @ x)
            y = y + g * (ex.w2_EDF[e] @ h)
        if block.shared is not None:
            y = y + block.shared(x.unsqueeze(0))[0]
        out.append(y)
    naive_moe.pi_TE, naive_moe.lse_T = pis, torch.stack(lse)
    return torch.stack(out), chosen


@dataclass
class NaiveAdamW:
    """AdamW (Loshchilov & Hutter 2019, Algorithm 2) from its equations, per parameter, with the conventions of
    torch.optim.AdamW that the trainer relies on: the decay is decoupled (it never enters the moments) and
    scaled by the learning rate, `p <- p - lr wd p`; both moments are bias-corrected by `1 - beta^t`, t counted
    from 1 per parameter; eps is added to the square root of the corrected second moment, outside it:
        m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        p <- p - lr wd p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)"""

    betas: tuple[float, float]
    eps: float
    m: dict[str, torch.Tensor] = field(default_factory=dict)
    v: dict[str, torch.Tensor] = field(default_factory=dict)
    t: dict[str, int] = field(default_factory=dict)

    def step(self, name: str, p: torch.Tensor, g: torch.Tensor, lr: float, weight_decay: float) -> torch.Tensor:
        """The parameter `name` after one step from `p` with gradient `g` (neither is modified)."""
        b1, b2 = self.betas
        t = self.t.get(name, 0) + 1
        m = b1 * self.m.get(name, torch.zeros_like(p)) + (1 - b1) * g
        v = b2 * self.v.get(name, torch.zeros_like(p)) + (1 - b2) * g * g
        self.t[name], self.m[name], self.v[name] = t, m, v
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        decayed = p - lr * weight_decay * p
        return decayed - lr * m_hat / (v_hat.sqrt() + self.eps)
