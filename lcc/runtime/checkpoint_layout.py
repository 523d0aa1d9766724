"""A rank's state as blocks of layout-free global tensors, for torch.distributed.checkpoint.

A checkpoint holds one key per logical tensor, with the tensor's global shape: `model/<param>`,
`optim/<param>/exp_avg`, `optim/<param>/exp_avg_sq`, `optim/<param>/step`, `bias/<buffer>`, `meta/step`
and `meta/rng`. What a rank holds of a parameter is one rectangular block of it (its tp or ep slice), or
with ZeRO a flat range of that block, which is a few rectangles (`flat_boxes`). Each rank hands DCP its
rectangles through `Blocks`, a tensor that implements DCP's checkpointable protocol
(`__create_write_items__`, `__create_chunk_list__`, `__get_tensor_shard__`, as DTensor does):

- saving, every rectangle is a write item keyed by (key, global offsets); ranks holding the same
  rectangle (replicas over dp, tp, the tied embedding's two pipeline ranks) offer the same item and DCP's
  global plan keeps one;
- loading, a rank asks for its own rectangles and DCP's planner reads the overlapping parts of whatever
  chunks the checkpoint was saved in, so any layout loads any other's checkpoint.

The ZeRO padding of the last piece is never saved, and is left as it is on load.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from lcc.plan.types import Parameter

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)
MOMENTS = ("exp_avg", "exp_avg_sq")


def flat_boxes(shape: Sequence[int], lo: int, hi: int) -> list[Box]:
    """Rectangles covering the elements [lo, hi) of a row-major tensor of `shape`, in order. Each is a
    contiguous flat range: some leading indices fixed, a range along one dimension, the rest whole."""
    shape = tuple(shape)
    if lo >= hi:
        return []
    if not shape:
        return [((), ())]
    inner = math.prod(shape[1:])
    first, last = -(-lo // inner), hi // inner  # the whole rows are [first, last)
    if lo % inner == 0 and hi % inner == 0:
        return [((first, *(0,) * (len(shape) - 1)), (last - first, *shape[1:]))]
    if lo // inner == (hi - 1) // inner:  # part of one row
        row = lo // inner
        return [((row, *o), (1, *s)) for o, s in flat_boxes(shape[1:], lo - row * inner, hi - row * inner)]
    boxes = flat_boxes(shape, lo, first * inner)
    if first < last:
        boxes += flat_boxes(shape, first * inner, last * inner)
    boxes += flat_boxes(shape, last * inner, hi)
    return boxes


def _flat_index(offsets: Sequence[int], shape: Sequence[int]) -> int:
    index = 0
    for o, n in zip(offsets, shape, strict=True):
        index = index * n + o
    return index


class Blocks(torch.Tensor):
    """A global tensor of which this rank holds some rectangular blocks (views into its own tensors),
    as DCP sees it. It has no storage of its own: it only carries the blocks to DCP's planners, which
    read and write the blocks themselves."""

    _blocks: dict[torch.Size, torch.Tensor]

    @staticmethod
    def __new__(cls, size: Sequence[int], dtype: torch.dtype,
                blocks: Sequence[tuple[Sequence[int], torch.Tensor]]) -> Blocks:
        r = torch.Tensor._make_wrapper_subclass(cls, torch.Size(size), dtype=dtype, device="cpu")
        r._blocks = {}
        for offsets, t in blocks:
            if t.dtype != dtype or len(offsets) != len(size) or t.dim() != len(size):
                raise ValueError(f"a block {tuple(t.shape)} {t.dtype} at {tuple(offsets)} of a {tuple(size)} "
                                 f"{dtype} tensor")
            r._blocks[torch.Size(offsets)] = t
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        raise TypeError(f"{func}: a checkpoint's Blocks only carry blocks to torch.distributed.checkpoint")

    def __repr__(self) -> str:  # type: ignore[override]
        return f"Blocks({tuple(self.shape)}, {self.dtype}, {len(self._blocks)} blocks)"

    def _chunk_list(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=o, sizes=t.shape) for o, t in self._blocks.items()]

    def __create_write_items__(self, fqn: str, object: Any) -> list[WriteItem]:  # noqa: A002 - DCP's name
        properties = TensorProperties(dtype=self.dtype)
        return [WriteItem(index=MetadataIndex(fqn, c.offsets), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=c, properties=properties, size=self.shape))
                for c in self._chunk_list()]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return self._chunk_list()

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        block = self._blocks.get(torch.Size(index.offset or ()))
        if block is None:
            raise ValueError(f"{index.fqn}: this rank holds no block at {index.offset}")
        return block


def origin(meta: Parameter, coords: dict[str, int], sizes: dict[str, int]) -> tuple[int, ...]:
    """Where this rank's local tensor of a parameter starts in the global one (its tp or ep slice)."""
    out = [0] * len(meta.global_shape)
    if meta.shard is not None:
        d = meta.shard.dim
        out[d] = meta.shard.part(coords, sizes) * meta.local_shape[d]
    return tuple(out)


def local_blocks(meta: Parameter, start: tuple[int, ...], t: torch.Tensor,
                 flat: tuple[int, int] | None = None) -> Blocks:
    """`t` as blocks of the global tensor of parameter `meta`: the whole local tensor starting at `start`,
    or (`flat` = (lo, hi)) a flat tensor holding the local tensor's elements [lo, hi), maybe padded."""
    shape = meta.local_shape
    if flat is None:
        return Blocks(meta.global_shape, t.dtype, [(start, t)])
    lo, hi = flat
    data = t.reshape(-1)
    blocks = []
    for offsets, box in flat_boxes(shape, lo, hi):
        first = _flat_index(offsets, shape) - lo
        view = data[first:first + math.prod(box)].view(box)
        blocks.append((tuple(s + o for s, o in zip(start, offsets, strict=True)), view))
    return Blocks(meta.global_shape, t.dtype, blocks)


def rank_state(step: int, meta: dict[str, Parameter], params: dict[str, torch.Tensor],
               masters: dict[str, torch.Tensor], optimizer_state: dict[torch.Tensor, dict[str, Any]],
               bias: dict[str, torch.Tensor], zero: int, bounds: Callable[[str], tuple[int, int]] | None,
               coords: dict[str, int], sizes: dict[str, int]) -> dict[str, Any]:
    """A rank's checkpoint state under global keys. `params`: whole local tensors, or (ZeRO 3) padded flat
    pieces; `masters`: what the optimizer updates (the parameters, or with ZeRO 1 and 2 unpadded pieces);
    `bounds(name)` (with ZeRO): the flat range of the local tensor that a piece holds. Optimizer states
    that do not exist yet are created (zero), so that a load has somewhere to go."""
    out: dict[str, Any] = {"meta/step": torch.tensor(step, dtype=torch.int64), "meta/rng": torch.get_rng_state()}
    for name, p in params.items():
        m = meta[name]
        start = origin(m, coords, sizes)
        piece = bounds(name) if zero and bounds is not None else None
        out[f"model/{name}"] = local_blocks(m, start, p.data, piece if zero >= 3 else None)
        master = masters[name]
        st = optimizer_state[master]
        if not st:
            st.update(step=torch.zeros((), dtype=torch.float32, device=master.device),
                      exp_avg=torch.zeros_like(master), exp_avg_sq=torch.zeros_like(master))
        for moment in MOMENTS:
            out[f"optim/{name}/{moment}"] = local_blocks(m, start, st[moment], piece)
        out[f"optim/{name}/step"] = st["step"]
    for name, b in bias.items():
        out[f"bias/{name}"] = b
    return out
