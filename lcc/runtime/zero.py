"""ZeRO in the runtime: which flat piece of each parameter a rank owns, and the step's collectives.

A parameter's piece is `lcc.ops.zero`'s: its local tensor (after tp/ep splitting) flattened and cut into
`parts` pieces along its ZeRO axis (dp for dense parameters, edp for experts), the last zero-padded.

- ZeRO 1: ranks keep their whole local parameters; the optimizer updates only this rank's piece (a view
  into the parameter, unpadded) and holds states for it; gradients are all-reduced and sliced; the
  updated pieces are all-gathered.
- ZeRO 2: as 1, but gradients are reduce-scattered into the pieces by bucket (lcc.runtime.grad_sync).
- ZeRO 3: the parameters are the pieces (programs all-gather them when they run); their gradients
  arrive reduce-scattered from backward.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lcc.ops import c10d
from lcc.ops.groups import group_size
from lcc.ops.zero import chunk_size, shard_flat
from lcc.plan.types import Parameter


class ZeroLayout:
    def __init__(self, meta: dict[str, Parameter], coords: dict[str, int], groups: Any):
        self.meta, self.coords, self.groups = meta, coords, groups

    def axis(self, name: str) -> str:
        return self.meta[name].zero.axis

    def parts(self, name: str) -> int:
        return self.meta[name].zero.parts

    def index(self, name: str) -> int:
        return self.coords[self.axis(name)]

    def group(self, name: str) -> Any:
        return getattr(self.groups, self.axis(name))

    def numel(self, name: str) -> int:
        return math.prod(self.meta[name].local_shape)

    def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's piece of a full local tensor, zero-padded to the common size (a new tensor)."""
        return shard_flat(full, self.parts(name), self.index(name))

    def bounds(self, name: str) -> tuple[int, int]:
        """The flat element range of this rank's piece (without the padding)."""
        n = self.numel(name)
        chunk = chunk_size(n, self.parts(name))
        return min(self.index(name) * chunk, n), min((self.index(name) + 1) * chunk, n)

    def piece(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's piece of a full local tensor, unpadded: a view into it."""
        lo, hi = self.bounds(name)
        return full.reshape(-1)[lo:hi]

    def unshard(self, name: str, piece: torch.Tensor) -> torch.Tensor:
        """The full local tensor from every rank's piece, padded or not (an all-gather)."""
        full = self._gather(name, self.padded(name, piece))
        return full[:self.numel(name)].view(self.meta[name].local_shape)

    def optimizer_piece(self, name: str, grad: torch.Tensor, zero: int) -> torch.Tensor:
        """The gradient of `name` as ZeRO 1 or 2's optimizer updates it, this rank's piece unpadded: ZeRO 2's
        reduce-scattered piece cut to it; ZeRO 1's copied off the whole gradient (which is then freed), or the
        whole itself where the ZeRO axis has one rank."""
        lo, hi = self.bounds(name)
        if zero == 2:
            return grad[:hi - lo]
        piece = self.piece(name, grad)
        return piece.clone() if self.parts(name) > 1 else piece

    def scale_experts(self, name: str, grad: torch.Tensor, factors: torch.Tensor) -> None:
        """Multiply this rank's piece of expert parameter `name`'s gradient (`grad`: the piece, padded or
        not) by its experts' factors (one per expert of this rank), in place, a slice per expert run
        instead of a factor per element; padding is zeroed."""
        flat, f = grad.view(-1), factors.to(grad.dtype)
        per = self.numel(name) // factors.numel()
        lo, hi = self.bounds(name)
        pos, valid = 0, hi - lo
        while pos < valid:
            expert, into = divmod(lo + pos, per)
            whole = (valid - pos) // per if into == 0 else 0
            if whole:  # whole experts: one broadcast multiply
                flat[pos:pos + whole * per].view(whole, per).mul_(f[expert:expert + whole, None])
                pos += whole * per
            else:  # the part of one expert at either end of the piece
                end = min(valid, pos + per - into)
                flat[pos:end].mul_(f[expert])
                pos = end
        flat[valid:].zero_()

    def padded(self, name: str, piece: torch.Tensor) -> torch.Tensor:
        """`piece` of `name` at the chunk size every rank's piece has (zeros after a short last piece): what
        an all-gather of the pieces takes."""
        chunk = chunk_size(self.numel(name), self.parts(name))
        if piece.numel() == chunk:
            return piece
        out = piece.new_zeros(chunk)
        out[:piece.numel()] = piece.reshape(-1)
        return out

    def _gather(self, name: str, piece: torch.Tensor) -> torch.Tensor:
        group = self.group(name)
        if group_size(group) == 1:
            return piece.detach()
        full = piece.new_empty(piece.numel() * group_size(group))
        c10d.all_gather_single(full, piece.detach().contiguous(), group=group)
        return full
