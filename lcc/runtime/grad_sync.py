"""The plan's gradient buckets, executed: each issued as soon as backward has produced all of its
gradients, so that it overlaps the rest of backward.

A bucket of stage s is live in the stage's last backward of the step (`when: step`) or in each of its
backwards (`microbatch`). A hook on each parameter notes when its gradient for the running backward is
accumulated; a bucket is issued as soon as it and the buckets before it on the same process group are
complete (every rank of a group then issues the same collectives in the same order, while buckets of
different groups, such as the dense parameters' over dp and the experts' over edp, do not wait for each
other); a bucket on a group that the program's own collectives use is issued after backward. The stage's
`REDUCE_GRAD` action issues what is left (gradients a backward did not reach count as zeros), waits, and
runs the bucket's further axes on the result.

- all_reduce: the gradients flattened into one tensor (the parameters' own dropped at once), reduced in
  place; each parameter's reduced gradient is a view of it.
- reduce_scatter (ZeRO 2): every parameter's gradient padded and cut into the ZeRO axis's pieces, one
  reduce-scatter for the bucket; the whole gradients are freed at once and this rank's pieces accumulate
  over the micro-batches (`microbatch`) or arrive once (`step`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from lcc.ops import c10d
from lcc.ops.groups import group_size
from lcc.ops.zero import piece_grid
from lcc.plan.types import GradBucket, Role, chunk_size


class GradSync:
    def __init__(self, roles: dict[int, Role], params: dict[str, torch.nn.Parameter], group: Callable[[str], Any],
                 parts: Callable[[str], int]):
        self.buckets: dict[int, list[GradBucket]] = {s: list(r.grad_buckets) for s, r in roles.items()}
        self.params, self.group, self.parts = params, group, parts
        self.where: dict[str, tuple[int, int]] = {}
        for s, buckets in self.buckets.items():
            for i, b in enumerate(buckets):
                for name in b.params:
                    self.where[name] = (s, i)
                    params[name].register_post_accumulate_grad_hook(self._hook(name))
        # the process groups each stage's program uses (forward collectives rerun in backward when recomputed)
        self.busy = {s: {id(group(c.axis)) for c in (*r.forward, *r.backward)} for s, r in roles.items()}
        self.stage: int | None = None
        self.final = False
        self.ready: dict[int, set[str]] = {}
        self.issued: set[int] = set()  # buckets of the running backward issued (or not live in it)
        self.pending: list[tuple[int, Any, torch.Tensor]] = []  # (bucket, work, its flat tensor)
        self.flat: dict[tuple[int, int], torch.Tensor] = {}  # reduced (or accumulated pieces) per bucket
        self.reduced: dict[str, torch.Tensor] = {}  # the step's result per parameter: whole, or a padded piece

    # ------------------------------------------------------------------------------ backward
    def begin(self, stage: int, final: bool) -> None:
        """Before a backward of `stage`; `final`: its last in this step."""
        self.stage, self.final, self.ready, self.issued = stage, final, {}, set()

    def _live(self, b: GradBucket) -> bool:
        return self.final or b.when == "microbatch"

    def _hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            s, i = self.where[name]
            if s == self.stage and self._live(self.buckets[s][i]):
                self.ready.setdefault(i, set()).add(name)
                self._issue(complete_only=True)

        return hook

    def _issue(self, complete_only: bool) -> None:
        """Issue, on each process group, the buckets that are complete and come next in the plan's order of
        that group's buckets (only the order within a group must be the same on every rank). During
        backward (`complete_only`), a bucket whose group the program's own collectives also use waits for
        the end of backward: where it would fall among them depends on autograd's order, which may differ
        between ranks."""
        buckets = self.buckets.get(self.stage, [])
        by_group: dict[int, list[int]] = {}
        for i, b in enumerate(buckets):
            by_group.setdefault(id(self.group(b.axes[0])), []).append(i)
        for key, members in by_group.items():
            if complete_only and key in self.busy.get(self.stage, set()):
                continue
            for i in members:
                if i in self.issued:
                    continue
                b = buckets[i]
                if self._live(b):
                    if complete_only and len(self.ready.get(i, ())) < len(b.params):
                        break
                    self._start(i, b)
                self.issued.add(i)

    def _start(self, i: int, b: GradBucket) -> None:
        grads = [self.params[n].grad if self.params[n].grad is not None else torch.zeros_like(self.params[n])
                 for n in b.params]
        group = self.group(b.axes[0])
        if b.op == "all_reduce":
            flat = torch.cat([g.reshape(-1) for g in grads])
            self._free(b)
            self.pending.append((i, dist.all_reduce(flat, group=group, async_op=True), flat))
            return
        parts = self.parts(b.params[0])
        chunks = [chunk_size(g.numel(), parts) for g in grads]
        grid = piece_grid(grads, chunks, parts)
        self._free(b)
        out = grid.new_empty(sum(chunks))
        self.pending.append((i, c10d.reduce_scatter_single(out, grid.view(-1), group=group, async_op=True), out))

    def _free(self, b: GradBucket) -> None:
        """The bucket's gradients are in its flat tensor: the parameters' own are dropped at once."""
        for n in b.params:
            self.params[n].grad = None

    def _wait(self) -> None:
        for i, work, flat in self.pending:
            work.wait()
            key = (self.stage, i)
            if key in self.flat:  # pieces of an earlier micro-batch
                self.flat[key] += flat
            else:
                self.flat[key] = flat
        self.pending = []

    def after_backward(self) -> None:
        """After a backward that is not the stage's last: its `microbatch` buckets issued and accumulated."""
        if not self.final:
            self._issue(complete_only=False)
            self._wait()

    # ------------------------------------------------------------------------------- REDUCE_GRAD
    def reduce_grad(self, stage: int) -> None:
        """The stage's buckets complete: what is left issued, everything waited for, further axes reduced."""
        self._issue(complete_only=False)
        self._wait()
        for i, b in enumerate(self.buckets.get(stage, [])):
            flat = self.flat.pop((stage, i))
            for axis in b.axes[1:]:
                group = self.group(axis)
                if group_size(group) > 1:
                    dist.all_reduce(flat, group=group)
            if b.op == "all_reduce":
                sizes = [self.params[n].numel() for n in b.params]
                for n, part in zip(b.params, flat.split(sizes), strict=True):
                    self.reduced[n] = part.view(self.params[n].shape)
            else:
                parts = self.parts(b.params[0])
                sizes = [chunk_size(self.params[n].numel(), parts) for n in b.params]
                self.reduced.update(zip(b.params, flat.split(sizes), strict=True))
        self.stage = None

    def take(self) -> dict[str, torch.Tensor]:
        """The step's reduced gradients (parameters in no bucket are not in it); cleared for the next step."""
        out, self.reduced = self.reduced, {}
        return out

    def held(self) -> list[torch.Tensor]:
        """What the buckets hold between backward and the step's end (for memory accounting)."""
        return [*self.flat.values(), *self.reduced.values()]


def held_gradients(sync: GradSync, roles: dict, params: dict[str, torch.Tensor], zero: int,
                   layout: Any) -> dict[str, torch.Tensor]:
    """Each parameter's gradient as its bucket left it: whole local tensors, or (ZeRO 2, reduce-scattered;
    ZeRO 3, from the programs' gathers) this rank's padded piece. The parameters' own `.grad` are cleared."""
    reduced = sync.take()
    pieces = {n for role in roles.values() for b in role.grad_buckets if b.op == "reduce_scatter" for n in b.params}
    grads = {}
    for name, p in params.items():
        g = reduced.get(name)
        if g is None:  # in no bucket: nothing to reduce it over
            g = p.grad if p.grad is not None else torch.zeros_like(p)
        if zero == 2 and name not in pieces:  # over a ZeRO axis of one rank: the whole piece
            g = layout.shard(name, g)
        p.grad = None
        grads[name] = g
    return grads
