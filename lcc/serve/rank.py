"""One serving rank: its programs, weights, KV cache and routing tables, and one engine step on them.

A step is a `StepPlan` from rank 0 (every dp rank's sequences: first position, tokens, block table,
whether its logits are wanted). Each rank builds its dp rank's `StepBatch`, runs its stages' programs in
the plan's order (receiving the previous stage's activations, sending its own to the next), and the last
stage's tp rank 0 of each dp rank returns the logits to rank 0. Ranks with no tokens in a step still run
their stages, so that the expert-parallel all-to-alls, which span dp ranks, line up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lcc.actions import Action
from lcc.backends.cpu import native
from lcc.ops.serve import KVCache, RoutingTables, StepBatch, serving_routing
from lcc.plan import read_plan
from lcc.runtime.device import running_on
from lcc.runtime.engine import load_program
from lcc.runtime.mesh import build_mesh
from lcc.serve.routed import moe_sites, returned_rows
from lcc.serve.weights import DTYPES, check_checkpoint, load_shards, serving_weights, weight_bytes
from lcc.spec import Spec


@dataclass
class SeqPart:
    """A sequence's share of a step."""

    seq: int
    first: int  # position of its first token in this step
    tokens: list[int]
    table: list[int]  # its KV block table
    wants_logits: bool


@dataclass
class StepPlan:
    parts: list[list[SeqPart]]  # per dp rank
    routes: bool = False  # the returned rows' experts come back to rank 0 (lcc.serve.routed)
    counts: bool = False  # the reporting ranks' per-expert counts come back to rank 0

    def wanted(self) -> list[int]:
        """Rows whose logits each dp rank returns."""
        return [sum(p.wants_logits for p in parts) for parts in self.parts]


@dataclass
class ServeContext:
    """What serve programs receive as `ctx`."""

    routing: Any
    tables: dict[str, RoutingTables]
    batch: StepBatch | None = None
    tp_rank: int = 0
    tp_size: int = 1
    loads: dict[str, torch.Tensor] = field(default_factory=dict)
    record: bool = False
    prepared: dict[Any, Any] = field(default_factory=dict)  # what ops derive once from the rank's fixed weights
    # tokens routed to each expert since the rank started (or since rank 0 last collected them), by MoE site
    expert_counts: dict[str, torch.Tensor] = field(default_factory=dict)
    routes: dict[str, torch.Tensor] | None = None  # this step's: the experts of the rows whose logits it returns

    def observe(self, site: str, route: Any) -> None:
        """Every step: the tokens routed to each expert; the experts of the rows whose logits the step returns
        when the step asks for them (`routes` not None); routing statistics when asked for (`record`)."""
        counts = route.counts_E if route.counts_E is not None else route.load_E.to(torch.int64)
        if site in self.expert_counts:
            self.expert_counts[site] += counts.to(self.expert_counts[site].device)
        else:
            self.expert_counts[site] = counts.to(torch.int64).clone()
        if self.routes is not None:  # under tp, this rank routes its share of the step's tokens
            chosen_TK = route.experts_TK.masked_fill(~route.mask_TK, -1)
            rows = returned_rows(self.batch.last_rows.cpu(), self.batch.tokens, self.tp_size, self.tp_rank)
            self.routes[site] = chosen_TK.index_select(0, rows.to(chosen_TK.device)).cpu()
        if self.record:
            load = route.load_E
            self.loads[site] = self.loads[site] + load if site in self.loads else load.clone()


class ServeRank:
    def __init__(self, plan_dir: Path, rank: int, checkpoint_dir: Path | None = None, verify: bool = True,
                 device: torch.device | None = None):
        """`checkpoint_dir`: a checkpoint folder, or a checkpoint directory (its latest); `verify`: check its
        files' sizes and sha256 (the launcher does it once for every rank); `device`: where the weights, the
        KV cache and the steps live (lcc.runtime.device.join binds it)."""
        self.device = device = device if device is not None else torch.device("cpu")
        self.dir = Path(plan_dir)
        self.plan = plan = read_plan(self.dir)
        spec_data = json.loads((self.dir / "spec.json").read_text())
        self.spec = spec = Spec.model_validate(spec_data)
        self.mesh = build_mesh(plan, rank)
        c = self.mesh.coords
        serving = plan.serving
        if serving.native_cpu and device.type == "cpu" and (why := native.unavailable()) is not None:
            raise RuntimeError(f"{plan_dir}: the plan runs lcc's native CPU kernels, and {why}; compile the plan "
                               "with serve.cpu_kernels torch (PyTorch's kernels)")
        self.dtype = DTYPES[serving.dtype]
        folder, ident = (check_checkpoint(checkpoint_dir, spec_data, verify) if checkpoint_dir is not None
                         else (None, None))
        self.checkpoint = folder
        dense, buffers = load_shards(spec, plan, c, self.mesh.sizes, folder, ident)
        self.buffers = {n: b.to(device) for n, b in buffers.items()}
        self.params = serving_weights(spec, plan, dense, device)
        del dense
        self.roles = {r.stage: r for r in plan.roles_of(c["pp"])}
        self.programs = {s: load_program(self.dir / role.program) for s, role in self.roles.items()}
        self.actions = [Action.parse(a) for a in plan.schedule.actions[c["pp"]]]
        self.n_stages = plan.schedule.n_stages
        layers = [i for r in self.roles.values() for i in range(*r.layers)]
        self.cache = KVCache.allocate(layers, serving.kv_blocks, serving.block_size, serving.kv_heads,
                                      serving.head_dim, self.dtype, device)
        routing = serving_routing(spec.routing) if spec.routing is not None else None
        self.tables = self._tables(routing) if serving.routing_tables else {}
        self.ctx = ServeContext(routing, self.tables, tp_rank=c["tp"], tp_size=self.mesh.sizes["tp"])
        if spec.model.moe is not None:  # every MoE layer here counted from the start (the server reads them)
            self.ctx.expert_counts = {site: torch.zeros(spec.model.moe.n_experts, dtype=torch.int64, device=device)
                                      for site in self.moe_sites}
        self.d_model = spec.model.d_model

    def _tables(self, routing: Any) -> dict[str, RoutingTables]:
        out = {}
        for name in self.buffers:
            site = name.rsplit(".", 1)[0]  # layers.i.ffn.router
            out[site] = RoutingTables(self.params[f"{site}.centroids_GD"], self.params[f"{site}.weight_ED"],
                                      self.buffers[name], routing, self.plan.serving.routing_kernel == "native_cpu")
        return out

    @property
    def moe_sites(self) -> list[str]:
        """The MoE layers of this rank's stages, in layer order."""
        return [site for _, site in moe_sites(self, self.mesh.coords["pp"])]

    @property
    def weight_bytes(self) -> int:
        return weight_bytes(self.params)

    @property
    def last_stage_here(self) -> bool:
        return (self.n_stages - 1) in self.roles

    def logits_source(self, dp: int) -> int:
        """The rank that returns dp rank `dp`'s logits: the last stage's tp rank 0."""
        return self.mesh.rank_of[((self.n_stages - 1) % self.mesh.sizes["pp"], dp, 0)]

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> torch.Tensor | None:
        """Run this rank's stages on its dp rank's part of the step; returns the logits `[n, vocab]` on the
        rank that returns them (rank 0 gathers them: `gather_logits`)."""
        mine = plan.parts[self.mesh.coords["dp"]]
        batch = StepBatch.build(self.cache, [(p.first, len(p.tokens), p.table, p.wants_logits) for p in mine],
                                self.plan.serving.attention_kernel)
        self.ctx.routes = {} if plan.routes else None
        with running_on(self.device):
            return self._step(mine, batch.to(self.device))

    def _step(self, mine: list[SeqPart], batch: StepBatch) -> torch.Tensor | None:
        self.ctx.batch = batch
        T = batch.tokens
        # a step of decode tokens only runs the programs' decode_forward where the plan has one (its MoE layers
        # one native call each); statistics that observe the routing take the op-by-op forward
        entry = "decode_forward" if (self.plan.serving.decode_kernel == "native_cpu" and T and not batch.seqs
                                     and not self.ctx.record) else "forward"
        pp = self.mesh.sizes["pp"]
        outputs: dict[int, torch.Tensor] = {}
        received: dict[int, torch.Tensor] = {}
        for a in self.actions:
            if a.kind == "RECV_F":
                buf = torch.empty((1, T, self.d_model), dtype=self.dtype)
                if T:
                    dist.recv(buf, src=self.mesh.peer((a.stage - 1) % pp))
                received[a.stage] = buf
            elif a.kind == "F":
                if a.stage == 0:
                    x = torch.tensor([t for p in mine for t in p.tokens], dtype=torch.int64).view(1, T)
                else:
                    x = received.pop(a.stage) if a.stage in received else outputs.pop(a.stage - 1)
                run = getattr(self.programs[a.stage], entry)
                outputs[a.stage] = run(self.params, self.buffers, x, self.mesh.groups, self.ctx)
            elif a.kind == "SEND_F" and T:
                dist.send(outputs[a.stage].contiguous(), dst=self.mesh.peer((a.stage + 1) % pp))
        self.ctx.batch = None
        if self.last_stage_here and self.mesh.coords["tp"] == 0:
            return outputs[self.n_stages - 1]
        return None

    def gather_logits(self, plan: StepPlan, local: torch.Tensor | None) -> list[torch.Tensor | None]:
        """RETURN_LOGITS: each dp rank's logits at rank 0, on the host where the engine samples (None for a
        dp rank that wants none); other ranks send theirs and get an empty list."""
        with running_on(self.device):
            out = self._gather_logits(plan, local)
        return [t if t is None else t.cpu() for t in out]

    def _gather_logits(self, plan: StepPlan, local: torch.Tensor | None) -> list[torch.Tensor | None]:
        me = self.mesh.rank
        wanted = plan.wanted()
        V = self.spec.model.vocab_size
        if me != 0:
            if local is not None and wanted[self.mesh.coords["dp"]]:
                dist.send(local.contiguous(), dst=0)
            return []
        out: list[torch.Tensor | None] = []
        for dp, n in enumerate(wanted):
            src = self.logits_source(dp)
            if n == 0:
                out.append(None)
            elif src == 0:
                out.append(local)
            else:
                buf = torch.empty((n, V), dtype=self.dtype)
                dist.recv(buf, src=src)
                out.append(buf)
        return out
