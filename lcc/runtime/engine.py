"""One rank's training: run its pipeline actions, then reduce, shape, clip and step (a plain loop).

Reads only the plan folder (plan.json, spec.json, actions.txt, programs/). Numerics follow the reference
trainer (docs/model.md): the same units, the same loss normalisation, the same order of gradient
shaping, clipping, AdamW and load-bias update, so every layout computes what the reference computes.
"""

from __future__ import annotations

import contextlib
import json
import types
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lcc.actions import read_actions
from lcc.data.stream import TokenStream, corpus_tokens, split_corpus, step_units
from lcc.model.routing import update_bias
from lcc.model.shaping import token_count_factors
from lcc.model.stats import imbalance
from lcc.model.trainer import adamw, lr_at
from lcc.ops import ProgramContext, offload_gathered, vocab_parallel_cross_entropy
from lcc.runtime import checkpoint
from lcc.runtime.checkpoint import shard_key
from lcc.runtime.memory import LiveTensorBytes, storage_bytes
from lcc.runtime.mesh import Mesh, build_mesh
from lcc.runtime.shards import counts_once, local_parameters
from lcc.runtime.zero import ZeroLayout
from lcc.spec import Spec

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.float32}


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
    def __init__(self, plan_dir: Path, rank: int, spec_dir: Path | None = None, keep_grads: bool = False,
                 track_memory: bool = False):
        self.dir = Path(plan_dir)
        self.keep_grads = keep_grads  # keep each step's final local gradients (reduced, shaped) for tests
        self.last_grads: dict[str, torch.Tensor] = {}
        self.plan = json.loads((self.dir / "plan.json").read_text())
        resolved = json.loads((self.dir / "spec.json").read_text())
        self.spec = spec = Spec.model_validate(resolved)
        self.mesh: Mesh = build_mesh(self.plan, rank)
        c = self.mesh.coords
        self.dtype = DTYPES[spec.train.dtype]
        full = local_parameters(spec, self.plan, c, self.mesh.sizes, self.dtype)
        self.meta = {p["name"]: p for p in self.plan["parameters"] if p["name"] in full}
        self.zero = self.plan["memory"]["zero"]
        self.layout = ZeroLayout(self.meta, c, self.mesh.groups)
        if self.zero >= 3:  # the rank holds only its piece of each parameter
            self.params = {n: torch.nn.Parameter(self.layout.shard(n, p.data)) for n, p in full.items()}
        else:
            self.params = full
        del full
        # what the optimizer updates: the parameters, or with ZeRO 1 and 2 this rank's piece of each
        self.masters = ({n: torch.nn.Parameter(self.layout.piece(n, p.data)) for n, p in self.params.items()}
                        if self.zero in (1, 2) else self.params)
        self.grad_pieces: dict[str, torch.Tensor] = {}  # ZeRO 2: reduce-scattered gradients of the step
        if self.zero == 2:
            for name, p in self.params.items():
                p.register_post_accumulate_grad_hook(self._reduce_scatter_hook(name))
        self.bias = {f"layers.{i}.ffn.router.bias_E": torch.zeros(spec.model.moe.n_experts, dtype=torch.float64)
                     for i in spec.model.moe_layers} if spec.model.moe else {}
        self.stages = sorted(int(s[5:]) for s in self.plan["ranks"]["roles_of_pp_rank"][str(c["pp"])])
        self.programs = {s: load_program(self.dir / "programs" / f"stage{s}.py") for s in self.stages}
        self.actions = read_actions((self.dir / "actions.txt").read_text())[c["pp"]]
        self.n_stages = self.plan["schedule"]["n_stages"]
        matrices = {n for n, m in self.meta.items() if len(m["global_shape"]) >= 2}
        self.optimizer = adamw(spec, [p for n, p in self.masters.items() if n in matrices],
                               [p for n, p in self.masters.items() if n not in matrices])
        self.memory = LiveTensorBytes() if track_memory and not torch.cuda.is_available() else None
        if self.memory is not None:
            self.memory.track(self.model_states())
            for p in self.params.values():  # a gradient is a model state from the moment it is accumulated
                p.register_post_accumulate_grad_hook(self._mark_gradient)
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
            piece = self.layout.key(name) if self.zero else ""
            out[f"param/{key}{piece if self.zero >= 3 else ''}"] = p.data
            master = self.masters[name]
            st = self.optimizer.state[master]
            if not st:  # before the first step: create the moments so that a load has somewhere to go
                st.update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(master),
                          exp_avg_sq=torch.zeros_like(master))
            for field_name in ("exp_avg", "exp_avg_sq", "step"):
                out[f"adam/{field_name}/{key}{piece}"] = st[field_name]
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
    def model_states(self) -> list[torch.Tensor]:
        """Parameters, optimizer states, gradients (as backward leaves them) and load biases."""
        out = [*self.params.values(), *self.masters.values(), *self.bias.values(), *self.grad_pieces.values()]
        out += [p.grad for p in (*self.params.values(), *self.masters.values()) if p.grad is not None]
        out += [t for st in self.optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
        return out

    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step (tracking the bytes of live tensors when asked to)."""
        if self.memory is None:
            return self._train_step(step)
        self.memory.mark_states(self.model_states())
        self.memory.reset_peak()
        with self.memory:
            return self._train_step(step)

    def _train_step(self, step: int) -> dict[str, Any]:
        spec, par, c = self.spec, self.spec.parallelism, self.mesh.coords
        units = self._my_units(step)
        n_units = par.dp * par.pipeline.microbatches
        step_tokens = spec.train.global_batch * spec.train.seq_len
        ctx = ProgramContext(spec.routing, c["tp"])
        saving = offload_gathered if self.zero >= 3 else contextlib.nullcontext
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
                with saving():
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
        self.states_bytes = storage_bytes(self.model_states())  # weights, optimizer states, gradients
        return self._finish_step(step, ctx, ce_sum, step_tokens)

    def _router_losses(self, ctx: ProgramContext, before: dict[str, int], n_units: int) -> torch.Tensor:
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

    def _finish_step(self, step: int, ctx: ProgramContext, ce_sum: torch.Tensor, step_tokens: int) -> dict[str, Any]:
        spec, c, sizes = self.spec, self.mesh.coords, self.mesh.sizes
        grads = self._reduce_gradients()
        self._sum_tied_embedding(grads)
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
                    name = f"{site}.experts.{w}"
                    scale = (self.layout.expert_factors(name, mine, grads[name].numel()) if self.zero
                             else mine.view(-1, 1, 1))
                    grads[name].mul_(scale.to(grads[name].dtype))
        if self.keep_grads:  # whole local gradients, as with no ZeRO
            self.last_grads = {n: (self.layout.unshard(n, g) if self.zero else g).detach().clone()
                               for n, g in grads.items()}
        grad_norm = self._clip(grads, spec.train.optimizer.grad_clip)
        for name, g in grads.items():
            self.masters[name].grad = g
        lr = lr_at(spec, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.zero in (1, 2):
            for name, p in self.params.items():
                self.layout.gather_into(name, self.masters[name].data, p.data)
        for site, load in loads.items():
            update_bias(self.bias[f"{site}.router.bias_E"], load, spec.routing)
        world = None if self.mesh.world == 1 else dist.group.WORLD
        loss = ce_sum if c["tp"] == 0 else torch.zeros((), dtype=torch.float64)
        loss = self._all_reduce(loss, world)
        other = self.memory.other_peak if self.memory is not None else -1.0
        memory = torch.tensor([float(self._peak_bytes()), float(self.states_bytes), float(other)],
                              dtype=torch.float64)
        self._all_reduce(memory, world, dist.ReduceOp.MAX)
        router = {site: router_summary(load, k_hist[site], sizes["ep"]) for site, load in loads.items()}
        if world is not None and self.mesh.sizes["pp"] > 1:  # every stage's layers, in the record of each rank
            mine = router if c["dp"] == 0 and c["tp"] == 0 else {}
            parts: list[Any] = [None] * self.mesh.world
            dist.all_gather_object(parts, mine)
            router = {site: r for part in parts for site, r in part.items()}
        return {"step": step, "loss": float(loss) / step_tokens, "lr": lr, "grad_norm": grad_norm,
                "tokens": step_tokens, "peak_memory_bytes": int(memory[0]),
                "state_memory_bytes": int(memory[1]),
                "activation_memory_bytes": int(memory[2]) if memory[2] >= 0 else None,
                "router": dict(sorted(router.items(), key=lambda kv: int(kv[0].split(".")[1])))}

    def _peak_bytes(self) -> int:
        """This step's peak: live tensors when tracked; the CUDA allocator's peak; else the peak RSS."""
        if self.memory is not None:
            return self.memory.peak
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda.max_memory_allocated()
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux

    def _reduce_gradients(self) -> dict[str, torch.Tensor]:
        """Each parameter's gradient summed over the axes the plan names (data-parallel replicas, tp for
        partial routers), in the layout the optimizer updates: whole local tensors, or with ZeRO this
        rank's piece (reduce-scattered by ZeRO 2 here, by ZeRO 3 already in backward)."""
        grads = {}
        for name, p in self.params.items():
            if self.zero == 2:
                g = self.grad_pieces.pop(name, None)
                g = self.layout.shard(name, torch.zeros_like(p)) if g is None else g
            else:
                g = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = None
            for axis in self.meta[name]["grad_reduce"]:
                if not (self.zero >= 2 and axis == self.layout.axis(name)):
                    self._all_reduce(g, self._group(axis))
            if self.zero in (1, 2):  # the optimizer's piece: unpadded
                lo, hi = self.layout.bounds(name)
                g = g[:hi - lo] if self.zero == 2 else self.layout.piece(name, g).clone()
            grads[name] = g
        return grads

    def _mark_gradient(self, p: torch.Tensor) -> None:
        if p.grad is not None:  # (ZeRO 2 has already reduce-scattered it into a piece)
            self.memory.mark_states([p.grad])

    def _reduce_scatter_hook(self, name: str) -> Any:
        """ZeRO 2: once backward has accumulated a parameter's gradient, reduce-scatter it over the ZeRO
        axis into this rank's piece and drop the whole gradient."""

        def hook(p: torch.Tensor) -> None:
            piece = self.layout.reduce_scatter(name, p.grad)
            p.grad = None
            if name in self.grad_pieces:
                self.grad_pieces[name] += piece
            else:
                self.grad_pieces[name] = piece
                if self.memory is not None:
                    self.memory.mark_states([piece])

        return hook

    def _sum_tied_embedding(self, grads: dict[str, torch.Tensor]) -> None:
        """A tied head on the last stage holds a copy of the embedding: the two gradients are summed."""
        spec, par = self.spec, self.spec.parallelism
        if not (spec.model.tie_embeddings and par.pp > 1 and "embed.weight" in self.params):
            return
        grad = grads["embed.weight"]
        first, last = self.mesh.peer(0), self.mesh.peer((self.n_stages - 1) % par.pp)
        if first == last:
            return
        other = torch.empty_like(grad)
        peer = last if self.mesh.rank == first else first
        ops = [dist.P2POp(dist.isend, grad.clone(), peer), dist.P2POp(dist.irecv, other, peer)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        grad.add_(other)

    def _clip(self, grads: dict[str, torch.Tensor], max_norm: float) -> float:
        c, sizes = self.mesh.coords, self.mesh.sizes
        square = torch.zeros((), dtype=torch.float64)
        for name, g in grads.items():
            tied_copy = name == "embed.weight" and c["pp"] != 0
            if counts_once(self.meta[name], c, sizes) and not tied_copy:
                square += g.double().square().sum()
        norm = float(self._all_reduce(square, None if self.mesh.world == 1 else dist.group.WORLD).sqrt())
        scale = max_norm / (norm + 1e-6)  # as torch.nn.utils.clip_grad_norm_
        if max_norm > 0 and scale < 1:
            for g in grads.values():
                g.mul_(scale)
        return norm
