"""One rank's training: run its pipeline actions, then reduce, shape, clip and step (a plain loop).

Reads only the plan folder (plan.json, spec.json, actions.txt, programs/). Numerics follow the reference
trainer (docs/model.md): the same units, the same loss normalisation, the same order of gradient
shaping, clipping, AdamW and load-bias update, so every layout computes what the reference computes.
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lcc.actions import read_actions
from lcc.data.stream import TokenStream, corpus_tokens, split_corpus, step_units
from lcc.model.routing import RouteResult, update_bias
from lcc.model.shaping import token_count_factors
from lcc.model.stats import imbalance
from lcc.model.trainer import lr_at, make_optimizer
from lcc.ops import vocab_parallel_cross_entropy
from lcc.runtime import checkpoint
from lcc.runtime.checkpoint import shard_key
from lcc.runtime.mesh import Mesh, build_mesh
from lcc.runtime.shards import counts_once, local_parameters
from lcc.runtime.support import check_supported
from lcc.spec import Spec

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.float32}


@dataclass
class StepContext:
    """What programs see as `ctx`: the TP rank, the routing settings, and where router results go."""

    routing: Any
    tp_rank: int
    routes: dict[str, list[RouteResult]] = field(default_factory=dict)

    def observe(self, site: str, route: RouteResult) -> None:
        self.routes.setdefault(site, []).append(route)


def peak_memory_bytes() -> int:
    """This process's peak resident memory (CUDA: the allocator's peak)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def router_summary(load: torch.Tensor, k_hist: torch.Tensor, ep: int) -> dict[str, Any]:
    tokens = float(k_hist.sum())
    per_rank = load.view(ep, -1).sum(-1)
    return {"experts_per_token": float((k_hist * torch.arange(len(k_hist))).sum()) / max(tokens, 1.0),
            "k_histogram": k_hist[1:].tolist(), "load_per_expert": load.tolist(),
            "imbalance_expert": imbalance(load), "imbalance_ep_rank": imbalance(per_rank)}


def load_program(path: Path) -> types.ModuleType:
    module = types.ModuleType(path.stem)
    module.__file__ = str(path)
    exec(compile(path.read_text(), str(path), "exec"), module.__dict__)  # tracebacks land in the file
    return module


class RankEngine:
    def __init__(self, plan_dir: Path, rank: int, spec_dir: Path | None = None, keep_grads: bool = False):
        self.dir = Path(plan_dir)
        self.keep_grads = keep_grads  # keep each step's final local gradients (reduced, shaped) for tests
        self.last_grads: dict[str, torch.Tensor] = {}
        self.plan = json.loads((self.dir / "plan.json").read_text())
        resolved = json.loads((self.dir / "spec.json").read_text())
        check_supported(resolved)
        self.spec = spec = Spec.model_validate(resolved)
        self.mesh: Mesh = build_mesh(self.plan, rank)
        c = self.mesh.coords
        self.dtype = DTYPES[spec.train.dtype]
        self.params = local_parameters(spec, self.plan, c, self.mesh.sizes, self.dtype)
        self.meta = {p["name"]: p for p in self.plan["parameters"] if p["name"] in self.params}
        self.bias = {f"layers.{i}.ffn.router.bias_E": torch.zeros(spec.model.moe.n_experts, dtype=torch.float64)
                     for i in spec.model.moe_layers} if spec.model.moe else {}
        self.stages = sorted(int(s[5:]) for s in self.plan["ranks"]["roles_of_pp_rank"][str(c["pp"])])
        self.programs = {s: load_program(self.dir / "programs" / f"stage{s}.py") for s in self.stages}
        self.actions = read_actions((self.dir / "actions.txt").read_text())[c["pp"]]
        self.n_stages = self.plan["schedule"]["n_stages"]
        self.optimizer = make_optimizer(spec, torch.nn.ParameterList(self.params.values()))
        train, held_out = split_corpus(corpus_tokens(spec, spec_dir))
        self.stream = TokenStream(train, spec.train.seq_len)

    # ------------------------------------------------------------------------------ checkpoints
    def state(self, step: int) -> dict[str, torch.Tensor]:
        """Everything a resume needs, keyed by shard: parameters, AdamW moments and counts, load biases,
        and the number of optimizer steps taken (the data position and the schedule follow from it)."""
        out: dict[str, torch.Tensor] = {"meta/step": torch.tensor(step, dtype=torch.int64)}
        c, sizes = self.mesh.coords, self.mesh.sizes
        for name, p in self.params.items():
            key = shard_key(self.meta[name], c, sizes)
            out[f"param/{key}"] = p.data
            st = self.optimizer.state[p]
            if not st:  # before the first step: create the moments so that a load has somewhere to go
                st.update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(p),
                          exp_avg_sq=torch.zeros_like(p))
            for field_name in ("exp_avg", "exp_avg_sq", "step"):
                out[f"adam/{field_name}/{key}"] = st[field_name]
        for name, b in self.bias.items():
            if self._holds_layer(name):
                out[f"bias/{name}"] = b
        return out

    def _holds_layer(self, name: str) -> bool:
        layer = int(name.split(".")[1])
        return any(a <= layer < b for a, b in (self.plan["partition"]["stage_layers"][s] for s in self.stages))

    def save(self, directory: Path, step: int) -> Path:
        return checkpoint.save(directory, step, self.state(step), self.mesh.rank)

    def resume(self, directory: Path) -> int:
        """Load the latest checkpoint in `directory`; returns the number of steps it had taken (0 if none)."""
        path = checkpoint.latest(directory)
        if path is None:
            return 0
        state = self.state(0)
        checkpoint.load(path, state)
        return int(state["meta/step"])

    # ------------------------------------------------------------------------------------ helpers
    def _all_reduce(self, t: torch.Tensor, group: Any, op: Any = None) -> torch.Tensor:
        if self.mesh.world > 1 and group is not None:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=group)
        return t

    def _group(self, axis: str) -> Any:
        return getattr(self.mesh.groups, axis)

    def _my_units(self, step: int) -> list[torch.Tensor]:
        m = self.spec.parallelism.pipeline.microbatches
        units = step_units(self.stream, self.spec, step)
        return units[self.mesh.coords["dp"] * m:(self.mesh.coords["dp"] + 1) * m]

    # ---------------------------------------------------------------------------------- one step
    def train_step(self, step: int) -> dict[str, Any]:
        spec, par, c = self.spec, self.spec.parallelism, self.mesh.coords
        units = self._my_units(step)
        n_units = par.dp * par.pipeline.microbatches
        step_tokens = spec.train.global_batch * spec.train.seq_len
        ctx = StepContext(spec.routing, c["tp"])
        groups = self.mesh.groups
        inputs: dict[tuple[int, int], torch.Tensor] = {}
        outputs: dict[tuple[int, int], torch.Tensor] = {}
        grads_in: dict[tuple[int, int], torch.Tensor] = {}
        pending: list[Any] = []
        ce_sum = torch.zeros((), dtype=torch.float64)
        mb_shape = (units[0].shape[0], spec.train.seq_len, spec.model.d_model)
        self.optimizer.zero_grad(set_to_none=True)
        for a in self.actions:
            key = (a.stage, a.mb)
            if a.kind == "RECV_F":
                buf = torch.empty(mb_shape, dtype=self.dtype)
                dist.recv(buf, src=self.mesh.peer((a.stage - 1) % par.pp))
                inputs[key] = buf.requires_grad_()
            elif a.kind == "F":
                if a.stage == 0:
                    x = units[a.mb][:, :-1]
                elif key not in inputs:  # the previous stage ran on this rank
                    x = outputs[(a.stage - 1, a.mb)].detach().requires_grad_()
                    inputs[key] = x
                else:
                    x = inputs[key]
                routes_before = {k: len(v) for k, v in ctx.routes.items()}
                out = self.programs[a.stage].forward(self.params, self.bias, x, groups, ctx)
                router_losses = self._router_losses(ctx, routes_before, n_units)
                if a.stage == self.n_stages - 1:
                    ce = vocab_parallel_cross_entropy(out, units[a.mb][:, 1:], groups.tp, c["tp"] * out.shape[-1])
                    ce_sum += ce.detach().double()
                    outputs[key] = ce / step_tokens + router_losses
                else:
                    outputs[key] = out
                    outputs[(key, "aux")] = router_losses
            elif a.kind == "SEND_F":
                pending.append(dist.isend(outputs[key].detach().contiguous(),
                                          dst=self.mesh.peer((a.stage + 1) % par.pp)))
            elif a.kind == "RECV_B":
                buf = torch.empty(mb_shape, dtype=self.dtype)
                dist.recv(buf, src=self.mesh.peer((a.stage + 1) % par.pp))
                grads_in[key] = buf
            elif a.kind == "B":
                out = outputs.pop(key)
                if a.stage == self.n_stages - 1:
                    out.backward()
                else:
                    grad = grads_in.pop(key, None)
                    if grad is None:  # the next stage ran on this rank
                        grad = inputs[(a.stage + 1, a.mb)].grad
                    torch.autograd.backward([out, outputs.pop((key, "aux"))], [grad, torch.ones(())])
            elif a.kind == "SEND_B":
                pending.append(dist.isend(inputs[key].grad.contiguous(), dst=self.mesh.peer((a.stage - 1) % par.pp)))
        for work in pending:
            work.wait()
        return self._finish_step(step, ctx, ce_sum, step_tokens)

    def _router_losses(self, ctx: StepContext, before: dict[str, int], n_units: int) -> torch.Tensor:
        """z-loss (and Switch loss at tp 1) of the router calls this forward made, per unit. With tp > 1
        each rank saw 1/tp of the unit's tokens, so its z-loss mean counts 1/tp."""
        balance = self.spec.routing.balance if self.spec.routing is not None else None
        total = torch.zeros((), dtype=self.dtype)
        if balance is None:
            return total
        tp = self.spec.parallelism.tp
        for site, routes in ctx.routes.items():
            for r in routes[before.get(site, 0):]:
                total = total + (balance.aux_loss_coef * r.aux_loss + balance.z_loss_coef * r.z_loss / tp) / n_units
        return total

    def _finish_step(self, step: int, ctx: StepContext, ce_sum: torch.Tensor, step_tokens: int) -> dict[str, Any]:
        spec, c, sizes = self.spec, self.mesh.coords, self.mesh.sizes
        # gradients: sum over the axes the plan names (data-parallel replicas, tp for partial routers)
        for name, p in self.params.items():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            for axis in self.meta[name]["grad_reduce"]:
                self._all_reduce(p.grad, self._group(axis))
        self._sum_tied_embedding()
        # router loads of the step, summed over every rank of this pipeline stage
        loads: dict[str, torch.Tensor] = {}
        k_hist: dict[str, torch.Tensor] = {}
        for site, routes in sorted(ctx.routes.items()):
            loads[site] = self._all_reduce(sum(r.load_E for r in routes), self.mesh.stage_group)
            k_max = spec.routing.k.max
            hist = sum(torch.bincount(r.k_T, minlength=k_max + 1) for r in routes).to(torch.float64)
            k_hist[site] = self._all_reduce(hist, self.mesh.stage_group)
        if spec.train.gradient_shaping.experts == "token_count":
            for site, load in loads.items():
                factors = token_count_factors(load, step_tokens)
                per = spec.model.moe.n_experts // sizes["ep"]
                mine = factors[c["ep"] * per:(c["ep"] + 1) * per] if sizes["ep"] > 1 else factors
                for w in ("w1_EFD", "w3_EFD", "w2_EDF"):
                    p = self.params[f"{site}.experts.{w}"]
                    p.grad.mul_(mine.to(p.grad.dtype).view(-1, 1, 1))
        if self.keep_grads:
            self.last_grads = {n: p.grad.detach().clone() for n, p in self.params.items()}
        grad_norm = self._clip(spec.train.optimizer.grad_clip)
        lr = lr_at(spec, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        for site, load in loads.items():
            update_bias(self.bias[f"{site}.router.bias_E"], load, spec.routing)
        world = None if self.mesh.world == 1 else dist.group.WORLD
        loss = ce_sum if c["tp"] == 0 else torch.zeros((), dtype=torch.float64)
        loss = self._all_reduce(loss, world)
        peak = torch.tensor(float(peak_memory_bytes()), dtype=torch.float64)
        self._all_reduce(peak, world, dist.ReduceOp.MAX)
        router = {site: router_summary(load, k_hist[site], sizes["ep"]) for site, load in loads.items()}
        if world is not None and self.mesh.sizes["pp"] > 1:  # every stage's layers, in the record of each rank
            mine = router if c["dp"] == 0 and c["tp"] == 0 else {}
            parts: list[Any] = [None] * self.mesh.world
            dist.all_gather_object(parts, mine)
            router = {site: r for part in parts for site, r in part.items()}
        return {"step": step, "loss": float(loss) / step_tokens, "lr": lr, "grad_norm": grad_norm,
                "tokens": step_tokens, "peak_memory_bytes": int(peak),
                "router": dict(sorted(router.items(), key=lambda kv: int(kv[0].split(".")[1])))}

    def _sum_tied_embedding(self) -> None:
        """A tied head on the last stage holds a copy of the embedding: the two gradients are summed."""
        spec, par = self.spec, self.spec.parallelism
        if not (spec.model.tie_embeddings and par.pp > 1 and "embed.weight" in self.params):
            return
        grad = self.params["embed.weight"].grad
        first, last = self.mesh.peer(0), self.mesh.peer((self.n_stages - 1) % par.pp)
        if first == last:
            return
        other = torch.empty_like(grad)
        peer = last if self.mesh.rank == first else first
        ops = [dist.P2POp(dist.isend, grad.clone(), peer), dist.P2POp(dist.irecv, other, peer)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        grad.add_(other)

    def _clip(self, max_norm: float) -> float:
        c, sizes = self.mesh.coords, self.mesh.sizes
        square = torch.zeros((), dtype=torch.float64)
        for name, p in self.params.items():
            tied_copy = name == "embed.weight" and c["pp"] != 0
            if counts_once(self.meta[name], c, sizes) and not tied_copy:
                square += p.grad.double().square().sum()
        norm = float(self._all_reduce(square, None if self.mesh.world == 1 else dist.group.WORLD).sqrt())
        scale = max_norm / (norm + 1e-6)  # as torch.nn.utils.clip_grad_norm_
        if max_norm > 0 and scale < 1:
            for p in self.params.values():
                p.grad.mul_(scale)
        return norm
