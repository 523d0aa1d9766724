"""`lcc run train --transcript FILE`: every collective a rank issues during its training steps, as it
issues it (op; mesh axis, `tp|stage` where one group is both; shape; dtype; for all-to-alls the row
splits, the bytes this rank sends to ranks on other nodes, and for the small all-to-all of expert counts
the counts themselves), so that a run can be compared with what its plan says.

Recording wraps torch.distributed's collective functions while a step runs; the axis is found from the
process group (the plan's mesh groups; `world`; `pp` for point-to-point).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# function -> (recorded op, position of the tensor it contributes, position of its group)
RECORDED = {"all_reduce": ("all_reduce", 0, 2), "all_gather": ("all_gather", 1, 2),
            "all_gather_single": ("all_gather", 1, 2), "all_gather_into_tensor": ("all_gather", 1, 2),
            "reduce_scatter_single": ("reduce_scatter", 1, 3), "reduce_scatter_tensor": ("reduce_scatter", 1, 3),
            "all_to_all_single": ("all_to_all", 1, 4), "send": ("send", 0, None), "isend": ("send", 0, None),
            "recv": ("recv", 0, None), "irecv": ("recv", 0, None), "broadcast": ("broadcast", 0, 2),
            "all_gather_object": ("all_gather_object", None, 2), "barrier": ("barrier", None, 0)}


class Transcript:
    def __init__(self, path: Path, rank: int, axis_of: dict[Any, str], gpus_per_node: int = 1):
        self.path, self.rank, self.axis_of, self.per_node = Path(path), rank, axis_of, gpus_per_node
        self.step: int | None = None
        self.records: list[dict[str, Any]] = []

    def _axis(self, group: Any) -> str:
        if group is None:
            group = dist.group.WORLD
        return self.axis_of.get(group, "unknown")

    def _wrap(self, name: str, original: Any) -> Any:
        op, tensor_at, group_at = RECORDED[name]

        def recorded(*args: Any, **kwargs: Any) -> Any:
            record: dict[str, Any] = {"step": self.step, "op": op}
            if group_at is None:
                record["axis"] = "pp"
            else:
                group = kwargs.get("group", args[group_at] if len(args) > group_at else None)
                record["axis"] = self._axis(group)
            if tensor_at is not None:
                t = args[tensor_at] if len(args) > tensor_at else next(iter(kwargs.values()))
                record["shape"], record["dtype"] = list(t.shape), str(t.dtype).removeprefix("torch.")
            reduce = kwargs.get("op", args[1] if name == "all_reduce" and len(args) > 1 else None)
            if name == "all_reduce" and reduce is not None and reduce == dist.ReduceOp.MAX:
                record["op"] = "all_reduce_max"
            if name == "all_to_all_single":
                out, inp = args[0], args[1]
                out_splits = args[2] if len(args) > 2 else kwargs.get("output_split_sizes")
                in_splits = args[3] if len(args) > 3 else kwargs.get("input_split_sizes")
                record["in_splits"] = list(in_splits) if in_splits is not None else None
                record["out_splits"] = list(out_splits) if out_splits is not None else None
                group = kwargs.get("group", args[4] if len(args) > 4 else None)
                record["inter_node_bytes"] = self._inter_node_bytes(inp, in_splits, group)
            result = original(*args, **kwargs)
            if name == "all_to_all_single" and inp.dtype == torch.int64:  # the expert counts: what went where
                record["sent"], record["received"] = inp.tolist(), out.tolist()
            self.records.append(record)
            return result

        return recorded

    def _inter_node_bytes(self, inp: torch.Tensor, in_splits: Any, group: Any) -> int:
        """Bytes of an all-to-all's input that go to ranks on other nodes (node = rank // gpus_per_node)."""
        peers = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
        n = len(peers)
        splits = list(in_splits) if in_splits is not None else [inp.shape[0] // n] * n
        row = math.prod(inp.shape[1:]) * inp.element_size()
        mine = self.rank // self.per_node
        return sum(rows * row for rows, peer in zip(splits, peers, strict=True) if peer // self.per_node != mine)

    @contextlib.contextmanager
    def recording(self, step: int) -> Iterator[None]:
        self.step = step
        saved = {name: getattr(dist, name) for name in RECORDED if hasattr(dist, name)}
        try:
            for name, fn in saved.items():
                setattr(dist, name, self._wrap(name, fn))
            yield
        finally:
            for name, fn in saved.items():
                setattr(dist, name, fn)
            self.step = None

    def write(self) -> None:
        with open(self.path, "w") as f:
            for r in self.records:
                f.write(json.dumps({"rank": self.rank, **r}, sort_keys=True) + "\n")


def part_path(path: Path, rank: int) -> Path:
    return Path(f"{path}.rank{rank}")


def merge(path: Path, world: int) -> None:
    """The ranks' parts into one file (rank order), parts removed."""
    with open(path, "w") as out:
        for rank in range(world):
            part = part_path(path, rank)
            if part.is_file():
                out.write(part.read_text())
                part.unlink()


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
