"""Single-process training of the reference model: the ground truth that parallel runs must reproduce.

One optimizer step processes the step's units one after another (docs/model.md, "Single-process training"):
loss = sum over units of (cross-entropy summed over the unit's tokens / tokens in the step)
     + sum over units and MoE layers of (aux_loss_coef * Switch loss + z_loss_coef * z-loss) / units.
Then: expert gradient shaping from the step's loads, global-norm clipping, AdamW, load-bias update.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lcc.data.stream import TokenStream, corpus_tokens, split_corpus, step_units
from lcc.model.build import build_model
from lcc.model.shaping import shape_expert_grads
from lcc.model.stats import LayerRouting
from lcc.model.transformer import Transformer
from lcc.spec.models import Spec


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in float32 at least (float64 stays float64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def lr_at(spec: Spec, step: int) -> float:
    """Linear warm-up over warmup_steps, then cosine decay to min_lr_ratio * lr at the last step."""
    opt, total = spec.train.optimizer, spec.train.steps
    if step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    span = max(total - opt.warmup_steps, 1)
    progress = min((step - opt.warmup_steps) / span, 1.0)
    floor = opt.lr * opt.min_lr_ratio
    return floor + (opt.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(spec: Spec, model: torch.nn.Module) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    return adamw(spec, [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2])


def adamw(spec: Spec, decay: list[torch.Tensor], rest: list[torch.Tensor]) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (`decay`) and none on vectors (`rest`: norms). Fused: one pass
    over each tensor on CPU and CUDA (bitwise the per-tensor loop's result in float64, within one rounding
    in float32), as transformers' Trainer steps by default."""
    opt = spec.train.optimizer
    return torch.optim.AdamW([{"params": decay, "weight_decay": opt.weight_decay},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=opt.lr, betas=opt.betas, eps=opt.eps, fused=True)


def autocast(spec: Spec, device: torch.device) -> contextlib.AbstractContextManager:
    if spec.train.dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class ReferenceTrainer:
    def __init__(self, spec: Spec, model: Transformer | None = None, spec_dir: Path | None = None,
                 keep_grads: bool = False):
        self.spec = spec
        self.keep_grads = keep_grads  # keep each step's final gradients (shaped, before clipping) for tests
        self.last_grads: dict[str, torch.Tensor] = {}
        self.model = model if model is not None else build_model(spec)
        self.device = next(self.model.parameters()).device
        self.optimizer = make_optimizer(spec, self.model)
        train, held_out = split_corpus(corpus_tokens(spec, spec_dir), spec.train.data.held_out)
        self.stream = TokenStream(train, spec.train.seq_len)
        self.held_out = TokenStream(held_out, spec.train.seq_len)

    def unit_loss(self, unit: torch.Tensor, step_tokens: int, n_units: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss contribution of one unit, its summed cross-entropy)."""
        inputs, targets = unit[:, :-1].to(self.device), unit[:, 1:].to(self.device)
        with autocast(self.spec, self.device):
            logits = self.model(inputs)
        ce = F.cross_entropy(_wide(logits).flatten(0, 1), targets.flatten(), reduction="sum")
        loss = ce / step_tokens
        balance = self.spec.routing.balance if self.spec.routing is not None else None
        if balance is not None:
            for _, block in self.model.moe_blocks():
                st = block.last_stats
                loss = loss + (balance.aux_loss_coef * st.aux_loss + balance.z_loss_coef * st.z_loss) / n_units
        return loss, ce.detach()

    def train_step(self, step: int) -> dict[str, Any]:
        spec, model = self.spec, self.model
        model.train()
        units = step_units(self.stream, spec, step)
        step_tokens = sum(u.shape[0] for u in units) * spec.train.seq_len
        routing = {i: LayerRouting(b.n_experts, b.router.n_groups, b.router.cfg.k.max)
                   for i, b in model.moe_blocks()}
        self.optimizer.zero_grad(set_to_none=True)
        total_ce = torch.zeros((), dtype=torch.float64)
        for unit in units:
            loss, ce = self.unit_loss(unit, step_tokens, len(units))
            loss.backward()
            total_ce += ce.double().cpu()
            for i, block in model.moe_blocks():
                routing[i].add(block.last_stats)
        if spec.train.gradient_shaping.experts == "token_count":
            for i, block in model.moe_blocks():
                shape_expert_grads(block.experts, routing[i].load_E, step_tokens)
        if self.keep_grads:
            self.last_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        clip = spec.train.optimizer.grad_clip
        grads = [p for p in model.parameters() if p.grad is not None]
        grad_norm = (torch.nn.utils.clip_grad_norm_(grads, clip) if clip > 0
                     else torch.linalg.vector_norm(torch.stack([g.grad.norm() for g in grads])))
        lr = lr_at(spec, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        for i, block in model.moe_blocks():
            block.router.update_bias(routing[i].load_E)
        return {"step": step, "loss": float(total_ce / step_tokens), "lr": lr, "grad_norm": float(grad_norm),
                "tokens": step_tokens, "router": {i: r.summary() for i, r in routing.items()}}

    @torch.no_grad()
    def evaluate(self, n_sequences: int = 64, batch: int = 16) -> float:
        """Mean next-token cross-entropy (nats) on held-out sequences."""
        self.model.eval()
        total, count = 0.0, 0
        for start in range(0, n_sequences, batch):
            seqs = self.held_out.sequences(start, min(batch, n_sequences - start)).to(self.device)
            with autocast(self.spec, self.device):
                logits = self.model(seqs[:, :-1])
            total += float(F.cross_entropy(_wide(logits).flatten(0, 1), seqs[:, 1:].flatten(), reduction="sum"))
            count += seqs[:, 1:].numel()
        return total / count
