"""One rank's training: run its pipeline actions, then its step actions (a plain loop over the plan).

Reads only the plan folder: plan.json (the typed plan: mesh, shards, schedule, step actions, precision)
and the programs it names; spec.json only for what is not layout (the model's sizes, routing settings,
initialisation, optimizer, data). Numerics follow the reference trainer (docs/model.md): the same units,
loss normalisation, and order of gradient shaping, clipping, AdamW and load-bias update.
"""

from __future__ import annotations

import contextlib
import json
import types
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lcc.actions import Action, stage_rank
from lcc.data.stream import rank_units, streams
from lcc.data.tokenizer import plan_tokenizer
from lcc.model.routing import update_bias
from lcc.model.shaping import token_count_factors
from lcc.model.trainer import adamw, lr_at
from lcc.ops import ProgramContext, offload_gathered
from lcc.ops.zero import GatherBucket
from lcc.plan import read_plan
from lcc.plan.types import StepAction
from lcc.runtime import checkpoint
from lcc.runtime.checkpoint_identity import identity
from lcc.runtime.checkpoint_layout import rank_state
from lcc.runtime.compiled import compile_programs, compile_seconds
from lcc.runtime.device import running_on
from lcc.runtime.grad_sync import GradSync, held_gradients
from lcc.runtime.memory import LiveTensorBytes, storage_bytes
from lcc.runtime.mesh import Mesh, build_mesh
from lcc.runtime.model_files import plan_files
from lcc.runtime.shards import counts_once, local_parameters
from lcc.runtime.split_backward import backward_input, backward_weight
from lcc.runtime.step_figures import peak_bytes, router_summary, squared_norm
from lcc.runtime.trace import ActionTrace
from lcc.runtime.transcript import Transcript
from lcc.runtime.zero import ZeroLayout
from lcc.spec import Spec

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def load_program(path: Path) -> types.ModuleType:
    module = types.ModuleType(path.stem)
    module.__file__ = str(path)
    exec(compile(path.read_text(), str(path), "exec"), module.__dict__)  # tracebacks land in the file
    return module


class RankEngine:
    def __init__(self, plan_dir: Path, rank: int, spec_dir: Path | None = None, keep_grads: bool = False,
                 track_memory: bool = False, transcript: Path | None = None, device: torch.device | None = None,
                 trace: Path | None = None):
        """`device`: where the rank's tensors live (lcc.runtime.device.join binds it); weights are built on
        the CPU, the same bits on every device, and moved there once."""
        self.dir = Path(plan_dir)
        self.device = device = device if device is not None else torch.device("cpu")
        self.keep_grads = keep_grads  # keep step 1's final local gradients (reduced, shaped) for tests
        self.last_grads: dict[str, torch.Tensor] = {}
        self.plan = plan = read_plan(self.dir)
        self.spec = spec = Spec.model_validate(json.loads((self.dir / "spec.json").read_text()))
        self.mesh: Mesh = build_mesh(plan, rank)
        c = self.mesh.coords
        self.dtype = DTYPES[plan.precision.params]
        self.compute = DTYPES[plan.precision.compute]
        self.roles = {r.stage: r for r in plan.roles_of(c["pp"])}
        full = local_parameters(spec, plan, c, self.mesh.sizes, self.dtype)
        if device.type != "cpu":
            full = {n: torch.nn.Parameter(p.data.to(device)) for n, p in full.items()}
        self.meta = {n: plan.parameter(n) for n in full}
        self.zero = plan.memory.zero
        self.layout = ZeroLayout(self.meta, c, self.mesh.groups)
        if self.zero >= 3:  # the rank holds only its piece of each parameter
            self.params = {n: torch.nn.Parameter(self.layout.shard(n, p.data)) for n, p in full.items()}
        else:
            self.params = full
        del full
        # what the optimizer updates: the parameters, or with ZeRO 1 and 2 this rank's piece of each
        self.masters = ({n: torch.nn.Parameter(self.layout.piece(n, p.data)) for n, p in self.params.items()}
                        if self.zero in (1, 2) else self.params)
        self.sync = GradSync(self.roles, self.params, self._group, self.layout.parts)
        self.bias = {b.name: torch.zeros(b.shape, dtype=DTYPES[b.dtype], device=device) for b in plan.buffers
                     if set(b.stages) & set(self.roles)}
        self.programs = {s: load_program(self.dir / role.program) for s, role in self.roles.items()}
        compile_programs(self.programs, self.roles)
        self.compiles = any(role.compiled for role in self.roles.values())
        self.actions = [Action.parse(a) for a in plan.schedule.actions[c["pp"]]]
        self.last_backward = {a.stage: i for i, a in enumerate(self.actions) if a.kind in ("B", "W")}
        self.weights = list(self.params.values())
        self.step_actions: list[StepAction] = plan.schedule.step[c["pp"]]
        self.n_stages = plan.schedule.n_stages
        matrices = {n for n, m in self.meta.items() if len(m.global_shape) >= 2}
        self.optimizer = adamw(spec, [p for n, p in self.masters.items() if n in matrices],
                               [p for n, p in self.masters.items() if n not in matrices])
        self.memory = LiveTensorBytes() if track_memory and device.type == "cpu" else None
        if self.memory is not None:
            self.memory.track(self.model_states())
            for p in self.params.values():  # a gradient is a model state from the moment it is accumulated
                p.register_post_accumulate_grad_hook(self._mark_gradient)
        self.transcript = (Transcript(transcript, rank, self.mesh.axis_of(), plan.mesh.gpus_per_node)
                           if transcript else None)
        self.trace = ActionTrace(trace, rank) if trace else None  # lcc run train --trace (lcc.runtime.trace)
        self.kept = plan_files(plan_dir)  # what checkpoints keep beside the tensors (lcc.runtime.model_files)
        self.stream, self.val_stream = streams(spec, spec_dir, plan_tokenizer(plan_dir), plan.data.seq_len, device,
                                               plan.data.validation is not None)

    # ------------------------------------------------------------------------------ checkpoints
    def state(self, step: int) -> dict[str, Any]:
        """Everything a resume needs, under layout-free keys (lcc.runtime.checkpoint_layout): the blocks
        this rank holds of the parameters and AdamW moments, AdamW's step counts, load biases, the number of
        optimizer steps taken (the data position and the schedule follow from it) and the RNG state."""
        bounds = self.layout.bounds if self.zero else None
        return rank_state(step, self.meta, self.params, self.masters, self.optimizer.state, self.bias, self.zero,
                          bounds, self.mesh.coords, self.mesh.sizes)

    def save(self, directory: Path, step: int, keep: int = 0) -> Path:
        """Save the checkpoint after `step` steps in `directory`; then keep only the newest `keep` (0: all)."""
        spec = json.loads((self.dir / "spec.json").read_text())
        return checkpoint.save(directory, step, self.state(step), self.mesh.rank, identity(spec, step), keep,
                               self.kept)

    def load_weights(self, path: Path) -> None:
        """Take the parameters and load biases of checkpoint folder `path` (saved under any layout, or
        converted by lcc checkpoint import-hf); the optimizer starts afresh."""
        state = {k: v for k, v in self.state(0).items() if k.startswith(("model/", "bias/"))}
        self.kept.update(checkpoint.load(path, state))  # a Hugging Face model's own files go on with it

    def resume(self, path: Path) -> int:
        """Load checkpoint folder `path` (the launcher chose and checked it: checkpoint_resume.prepare), whatever
        layout saved it; returns the number of steps it had taken."""
        state = self.state(0)
        self.kept.update(checkpoint.load(path, state))
        torch.set_rng_state(state["meta/rng"])
        return int(state["meta/step"])

    # ------------------------------------------------------------------------------------ helpers
    def _group(self, axis: str) -> Any:
        if axis == "world":
            return None if self.mesh.world == 1 else dist.group.WORLD
        if axis == "stage":
            return self.mesh.stage_group
        return getattr(self.mesh.groups, axis)

    def _all_reduce(self, t: torch.Tensor, axis: str, op: Any = None) -> torch.Tensor:
        group = self._group(axis)
        if self.mesh.world > 1 and group is not None:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=group)
        return t

    def _my_units(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This dp rank's (inputs, targets) of the step (lcc.data.stream.rank_units)."""
        return rank_units(self.stream, self.plan.data, self.mesh.coords["dp"], step)

    def model_states(self) -> list[torch.Tensor]:
        """Parameters, optimizer states, gradients (as backward leaves them) and load biases."""
        out = [*self.params.values(), *self.masters.values(), *self.bias.values(), *self.sync.held()]
        out += [p.grad for p in (*self.params.values(), *self.masters.values()) if p.grad is not None]
        out += [t for st in self.optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
        return out

    # ---------------------------------------------------------------------------------- one step
    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step (tracking the bytes of live tensors, and recording collectives, when asked to)."""
        if not self.compiles:
            return self._record_step(step)
        before, record = compile_seconds(), self._record_step(step)
        return {**record, "compile_seconds": compile_seconds() - before}

    def _record_step(self, step: int) -> dict[str, Any]:
        recording = self.transcript.recording(step) if self.transcript else contextlib.nullcontext()
        timed = self.trace.recording(step) if self.trace else contextlib.nullcontext()
        with recording, timed, running_on(self.device):
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            if self.memory is None:
                return self._train_step(step)
            self.memory.mark_states(self.model_states())
            self.memory.reset_peak()
            with self.memory:
                return self._train_step(step)

    def _compute(self) -> contextlib.AbstractContextManager:
        """The plan's precision: autocast to the compute dtype when it differs from the parameters'."""
        if self.plan.precision.autocast:
            return torch.autocast(self.device.type, dtype=self.compute)
        return contextlib.nullcontext()

    def _train_step(self, step: int) -> dict[str, Any]:
        c = self.mesh.coords
        pp, kind = self.mesh.sizes["pp"], self.plan.schedule.kind
        units = self._my_units(step)
        data = self.plan.data
        step_tokens = max(1, self.stream.trained(step * data.global_batch, data.global_batch))  # targets counted
        ctx = ProgramContext(self.spec.routing, c["tp"])
        saving = offload_gathered if self.plan.memory.regathered else contextlib.nullcontext
        groups = self.mesh.groups
        inputs: dict[tuple[int, int], torch.Tensor] = {}
        outputs: dict[Any, torch.Tensor] = {}
        grads_in: dict[tuple[int, int], torch.Tensor] = {}
        pending: list[Any] = []
        split: dict[tuple[int, int], Any] = {}  # zero bubble: what each I leaves for its W
        ce_sum = torch.zeros((), dtype=torch.float64)
        mb_shape = tuple(self.plan.schedule.boundary_shape)
        self.optimizer.zero_grad(set_to_none=True)
        for index, a in enumerate(self.trace.actions(self.actions) if self.trace else self.actions):
            key = (a.stage, a.mb)
            ctx.segments = units[a.mb][2] if a.mb is not None else None  # document_mask: the micro-batch's
            if a.kind == "RECV_F":
                buf = torch.empty(mb_shape, dtype=self.dtype)
                dist.recv(buf, src=self.mesh.peer(stage_rank(a.stage - 1, pp, kind)))
                inputs[key] = buf.requires_grad_()
            elif a.kind == "F":
                if a.stage == 0:
                    x = units[a.mb][0]
                elif key not in inputs:  # the previous stage ran on this rank
                    x = outputs[(a.stage - 1, a.mb)].detach().requires_grad_()
                    inputs[key] = x
                else:
                    x = inputs[key]
                routes_before = {k: len(v) for k, v in ctx.routes.items()}
                program = self.programs[a.stage]
                with saving(), self._compute():
                    out = program.forward(self.params, self.bias, x, groups, ctx)
                router_losses = self._router_losses(ctx, routes_before, data.units_per_step)
                if a.stage == self.n_stages - 1:
                    with saving(), self._compute():
                        ce = program.loss(self.params, self.bias, out, units[a.mb][1], groups, ctx)
                    ce_sum += ce.detach().double()
                    outputs[key] = ce / step_tokens + router_losses
                else:
                    outputs[key] = out.to(self.dtype)
                    outputs[(key, "aux")] = router_losses
            elif a.kind == "SEND_F":
                peer = self.mesh.peer(stage_rank(a.stage + 1, pp, kind))
                pending.append(dist.isend(outputs[key].detach().contiguous(), dst=peer))
            elif a.kind == "RECV_B":
                buf = torch.empty(mb_shape, dtype=self.dtype)
                dist.recv(buf, src=self.mesh.peer(stage_rank(a.stage + 1, pp, kind)))
                grads_in[key] = buf
            elif a.kind == "I":  # zero bubble: the input's gradient now, the weights' at W (the first stage: W)
                ends = self._backward_ends(a, outputs, grads_in, inputs)
                split[key] = ends if a.stage == 0 else backward_input(*ends, inputs[key], self.weights)
            elif a.kind in ("B", "W"):
                final = index == self.last_backward[a.stage]
                self.sync.begin(a.stage, final)
                ctx.accumulating = self.zero >= 3 and self.plan.memory.grad_reduce == "step" and not final
                if a.kind == "W" and a.stage > 0:
                    backward_weight(split.pop(key))
                else:
                    torch.autograd.backward(*(split.pop(key) if a.kind == "W" else
                                              self._backward_ends(a, outputs, grads_in, inputs)))
                self.sync.after_backward()
            elif a.kind == "REDUCE_GRAD":
                self.sync.reduce_grad(a.stage)
            elif a.kind == "SEND_B":
                peer = self.mesh.peer(stage_rank(a.stage - 1, pp, kind))
                pending.append(dist.isend(inputs[key].grad.contiguous(), dst=peer))
        for work in pending:
            work.wait()
        self.states_bytes = storage_bytes(self.model_states())  # weights, optimizer states, gradients
        return self._finish_step(step, ctx, ce_sum, step_tokens)

    def _backward_ends(self, a: Any, outputs: dict, grads_in: dict, inputs: dict) -> tuple[list, list | None]:
        """(tensors, their gradients) a backward of stage a.stage starts from: the loss on the last stage, else
        the output with the next stage's input gradient and the router losses."""
        out = outputs.pop((a.stage, a.mb))
        if a.stage == self.n_stages - 1:
            return [out], None
        grad = grads_in.pop((a.stage, a.mb), None)
        if grad is None:  # the next stage ran on this rank
            grad = inputs[(a.stage + 1, a.mb)].grad
        aux = outputs.pop(((a.stage, a.mb), "aux"))  # a stage without routers has no router loss
        return ([out, aux], [grad, torch.ones(())]) if aux.requires_grad else ([out], [grad])

    def _router_losses(self, ctx: ProgramContext, before: dict[str, int], n_units: int) -> torch.Tensor:
        """z-loss (and Switch loss) of the router calls this forward made, per unit. With tp > 1 each rank
        saw 1/tp of the unit's tokens, so its z-loss mean counts 1/tp (its Switch loss is already its
        share: ops.unit_balance)."""
        balance = self.spec.routing.balance if self.spec.routing is not None else None
        total = torch.zeros((), dtype=self.dtype)
        if balance is None:
            return total
        tp = self.mesh.sizes["tp"]
        for site, routes in ctx.routes.items():
            for r in routes[before.get(site, 0):]:
                total = total + (balance.aux_loss_coef * r.aux_loss + balance.z_loss_coef * r.z_loss / tp) / n_units
        return total

    # ----------------------------------------------------------------------------- step actions
    def _finish_step(self, step: int, ctx: ProgramContext, ce_sum: torch.Tensor, step_tokens: int) -> dict[str, Any]:
        """The plan's step actions for this pipeline rank, in order; each issues exactly its collectives."""
        self.grads = held_gradients(self.sync, self.roles, self.params, self.zero, self.layout)
        self.in_pieces = False
        self.stats: dict[str, torch.Tensor] = {}
        self.ctx, self.step_tokens, self.grad_norm, self.record = ctx, step_tokens, 0.0, {}
        self.ce_sum, self.lr, self.step = ce_sum, lr_at(self.spec, step), step
        for action in self.step_actions:
            getattr(self, f"_do_{action.kind.lower()}")(action)
        self.grads = {}
        tokens = self.plan.data.global_batch * self.plan.data.seq_len  # run, whatever a loss mask counts
        return {"step": step, "lr": self.lr, "grad_norm": self.grad_norm, "tokens": tokens, **self.record}

    def _do_sum_tied_grad(self, action: StepAction) -> None:
        """A tied head on the last stage holds a copy of the embedding: the two gradients are summed."""
        grad = self.grads["embed.weight"]
        peer = self.mesh.peer(stage_rank(self.n_stages - 1 if action.stage == 0 else 0, self.mesh.sizes["pp"],
                                         self.plan.schedule.kind))
        other = torch.empty_like(grad)
        mine = grad.clone().contiguous()
        works = [dist.isend(mine, peer) if c.op == "send" else dist.irecv(other, peer) for c in action.collectives]
        for work in works:
            work.wait()
        grad.add_(other)

    def _sites(self) -> list[str]:
        return sorted({name.rsplit(".router.", 1)[0] for name in self.bias}, key=lambda s: int(s.split(".")[1]))

    def _do_reduce_router_stats(self, action: StepAction) -> None:
        """Loads and k histograms of the step, summed over every rank of this pipeline stage."""
        k_max = self.spec.routing.k.max
        rows = []
        for site in self._sites():
            routes = self.ctx.routes.get(site, [])
            n = self.spec.model.moe.n_experts
            load = sum((r.load_E for r in routes), torch.zeros(n, dtype=torch.float64))
            hist = torch.zeros(k_max + 1, dtype=torch.int64)  # a scatter-add, not bincount: no host read
            for r in routes:
                hist.scatter_add_(0, r.k_T.reshape(-1), torch.ones_like(r.k_T.reshape(-1)))
            hist = hist.to(torch.float64)
            rows.append(torch.cat([load, hist]))
        table = torch.stack(rows)
        for c in action.collectives:
            self._all_reduce(table, c.axis)
        self.stats = dict(zip(self._sites(), table.unbind(0), strict=True))

    def _optimizer_pieces(self) -> None:
        """The gradients in the layout the optimizer updates: whole local tensors, or with ZeRO 1 and 2
        this rank's piece, unpadded (`ZeroLayout.optimizer_piece`)."""
        if self.in_pieces:
            return
        self.in_pieces = True
        if self.zero in (1, 2):
            self.grads = {n: self.layout.optimizer_piece(n, g, self.zero) for n, g in self.grads.items()}

    def _do_clip_grad_norm(self, action: StepAction) -> None:
        """Token-count shaping of the expert gradients (before clipping, as the reference), then clipping
        to the global norm, each element counted once."""
        self._optimizer_pieces()
        grads, c, sizes = self.grads, self.mesh.coords, self.mesh.sizes
        if self.spec.train.gradient_shaping.experts == "token_count":
            per = self.plan.experts.experts_per_rank if self.plan.experts else 0
            for site, row in self.stats.items():
                tokens = self.plan.data.global_batch * self.plan.data.seq_len  # routed, masked or not
                factors = token_count_factors(row[:self.spec.model.moe.n_experts], tokens)
                mine = factors[c["ep"] * per:(c["ep"] + 1) * per]
                for w in ("w1_EFD", "w3_EFD", "w2_EDF"):
                    name = f"{site}.experts.{w}"
                    if self.zero:
                        self.layout.scale_experts(name, grads[name], mine)
                    else:
                        grads[name].mul_(mine.view(-1, 1, 1).to(grads[name].dtype))
        if self.keep_grads and self.step == 0:  # step 1's whole local gradients, as with no ZeRO (tests)
            self.last_grads = {n: (self.layout.unshard(n, g) if self.zero else g).detach().clone()
                               for n, g in grads.items()}
        square = torch.zeros((), dtype=torch.float64)
        for name, g in grads.items():
            tied_copy = name == "embed.weight" and c["pp"] != 0
            if counts_once(self.meta[name], c, sizes) and not tied_copy:
                square += squared_norm(g)
        for col in action.collectives:
            self._all_reduce(square, col.axis)
        norm = float(square.sqrt())
        max_norm = self.spec.train.optimizer.grad_clip
        scale = max_norm / (norm + 1e-6)  # as torch.nn.utils.clip_grad_norm_
        if max_norm > 0 and scale < 1:
            for g in grads.values():
                g.mul_(scale)
        self.grad_norm = norm

    def _do_optimizer_step(self, action: StepAction) -> None:
        self._optimizer_pieces()
        for name, g in self.grads.items():
            self.masters[name].grad = g
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.optimizer.step()

    def _do_unshard(self, action: StepAction) -> None:
        """ZeRO 1/2: every rank's updated pieces of a stage's parameters into whole parameters, one
        all-gather per ZeRO axis."""
        (c,) = action.collectives
        names = action.params
        pieces = [self.layout.padded(n, self.masters[n].data) for n in names]
        bucket = GatherBucket(names, pieces, [self.meta[n].local_shape for n in names], self._group(c.axis))
        buffer, _ = bucket.start()
        with torch.no_grad():
            bucket.copy_into(buffer, [self.params[n].data for n in names])

    def _do_update_bias(self, action: StepAction) -> None:
        n = self.spec.model.moe.n_experts
        for site, row in self.stats.items():
            update_bias(self.bias[f"{site}.router.bias_E"], row[:n], self.spec.routing)

    def _do_reduce_metrics(self, action: StepAction) -> None:
        c, sizes = self.mesh.coords, self.mesh.sizes
        loss = self.ce_sum if c["tp"] == 0 else torch.zeros((), dtype=torch.float64)
        other = self.memory.other_peak if self.memory is not None else -1.0
        memory = torch.tensor([float(peak_bytes(self.memory, self.device)), float(self.states_bytes), float(other)],
                              dtype=torch.float64)
        n = self.spec.model.moe.n_experts if self.spec.model.moe else 0
        stats = dict(self.stats)
        collectives = list(action.collectives)
        for col in collectives[:2]:
            self._all_reduce(loss if col.op == "all_reduce" else memory, col.axis,
                             dist.ReduceOp.MAX if col.op == "all_reduce_max" else None)
        if len(collectives) > 2:  # every stage's router statistics, in the record of each rank
            layers = list(self.spec.model.moe_layers)
            table = torch.zeros(len(layers), n + self.spec.routing.k.max + 1, dtype=torch.float64)
            if c["dp"] == 0 and c["tp"] == 0:
                for site, row in stats.items():
                    table[layers.index(int(site.split(".")[1]))] = row
            self._all_reduce(table, collectives[2].axis)
            stats = {f"layers.{i}.ffn": row for i, row in zip(layers, table.unbind(0), strict=True)}
        # the step's one read of its metrics: the loss, the memory figures and every router's statistics
        sites = list(stats)
        rows = torch.stack([stats[site] for site in sites]) if sites else torch.zeros(0, dtype=torch.float64)
        host = torch.cat([loss.reshape(1), memory, rows.reshape(-1)]).tolist()
        width = rows.shape[1] if sites else 0
        router = {}
        for i, site in enumerate(sites):
            row = host[4 + i * width:4 + (i + 1) * width]
            router[site] = router_summary(row[:n], row[n:], sizes["ep"])
        self.record = {"loss": host[0] / self.step_tokens, "peak_memory_bytes": int(host[1]),
                       "state_memory_bytes": int(host[2]),
                       "activation_memory_bytes": int(host[3]) if host[3] >= 0 else None,
                       "router": dict(sorted(router.items(), key=lambda kv: int(kv[0].split(".")[1])))}

    def _mark_gradient(self, p: torch.Tensor) -> None:
        if p.grad is not None:  # (ZeRO 2 has already reduce-scattered it into a piece)
            self.memory.mark_states([p.grad])
