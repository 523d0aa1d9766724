"""The loss on the validation split (the plan's `data.validation`, `train.eval_every`): the schedule's forward
actions alone over the validation batches, without gradients, then the summed cross-entropy over the world.

The validation split is what the training stream leaves out (lcc.data.stream: the last 5% of the tokens),
cut into sequences and units exactly as training batches are; every evaluation reads its first `batches`
global batches, so the figures of different steps are comparable. Routing runs as in training (the same
programs), but nothing an evaluation routes reaches the load-bias update or the step's statistics.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from lcc.actions import stage_rank
from lcc.data.stream import rank_units
from lcc.ops import ProgramContext

FORWARD = ("F", "SEND_F", "RECV_F")


@torch.no_grad()
def validation_loss(engine: Any) -> dict[str, float]:
    """{"val_loss", "val_perplexity"}, the same on every rank. Every rank calls it after the same step."""
    plan, mesh = engine.plan, engine.mesh
    data, spec = plan.data, plan.data.validation
    pp, kind = mesh.sizes["pp"], plan.schedule.kind
    dp = mesh.coords["dp"]
    total, counted = torch.zeros((), dtype=torch.float64), 0
    for batch in range(spec.batches):
        units = rank_units(engine.val_stream, data, dp, batch)
        counted += engine.val_stream.trained(batch * data.global_batch, data.global_batch)
        ctx = ProgramContext(engine.spec.routing, mesh.coords["tp"])
        inputs: dict[tuple[int, int], torch.Tensor] = {}
        outputs: dict[tuple[int, int], torch.Tensor] = {}
        pending = []
        for a in (a for a in engine.actions if a.kind in FORWARD):
            key, ctx.segments = (a.stage, a.mb), units[a.mb][2]
            if a.kind == "RECV_F":
                buf = torch.empty(tuple(plan.schedule.boundary_shape), dtype=engine.dtype)
                dist.recv(buf, src=mesh.peer(stage_rank(a.stage - 1, pp, kind)))
                inputs[key] = buf
            elif a.kind == "F":
                x = units[a.mb][0] if a.stage == 0 else inputs.pop(key, None)
                if x is None:  # the previous stage ran on this rank
                    x = outputs.pop((a.stage - 1, a.mb))
                program = engine.programs[a.stage]
                with engine._compute():
                    out = program.forward(engine.params, engine.bias, x, mesh.groups, ctx)
                    if a.stage == engine.n_stages - 1:
                        ce = program.loss(engine.params, engine.bias, out, units[a.mb][1], mesh.groups, ctx)
                        if mesh.coords["tp"] == 0:
                            total += ce.double()
                        continue
                outputs[key] = out.to(engine.dtype)
            else:  # SEND_F
                sent = outputs.pop(key).contiguous()  # held until the send completes
                pending.append((dist.isend(sent, dst=mesh.peer(stage_rank(a.stage + 1, pp, kind))), sent))
        for work, _ in pending:
            work.wait()
    if mesh.world > 1:  # the plan's data.validation.reduce
        dist.all_reduce(total)
    loss = float(total) / max(1, counted)  # per target token the loss counts (a loss mask's)
    return {"val_loss": loss, "val_perplexity": math.exp(loss) if loss < 700 else math.inf}
