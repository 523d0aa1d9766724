"""`lcc checkpoint info`: what a checkpoint holds, from its identity and DCP's metadata, without loading a
tensor."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lcc.runtime.checkpoint_dir import resolve
from lcc.runtime.checkpoint_files import CheckpointError
from lcc.runtime.checkpoint_identity import read_identity

KINDS = ("model", "optim", "bias", "meta")


def describe(path: Path) -> dict[str, Any]:
    """What `lcc checkpoint info` shows: the identity, and per key the global shape, dtype, bytes and how
    many chunks it was saved in, from DCP's metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = resolve(path)
    ident = read_identity(path)
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - DCP raises what its reader meets; the user gets one line
        raise CheckpointError(f"{path}: torch.distributed.checkpoint metadata unreadable "
                              f"({type(exc).__name__}: {exc})") from None
    tensors = []
    for key, md in sorted(metadata.state_dict_metadata.items()):
        if isinstance(md, TensorStorageMetadata):
            shape, dtype = list(md.size), md.properties.dtype
            tensors.append({"key": key, "shape": shape, "dtype": str(dtype).removeprefix("torch."),
                            "bytes": math.prod(shape) * dtype.itemsize, "chunks": len(md.chunks)})
        else:
            tensors.append({"key": key, "shape": None, "dtype": "bytes", "bytes": 0, "chunks": 1})
    holds: dict[str, dict[str, int]] = {}
    for t in tensors:
        kind = t["key"].split("/", 1)[0]
        entry = holds.setdefault(kind, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += t["bytes"]
    holds = dict(sorted(holds.items(), key=lambda kv: (KINDS.index(kv[0]) if kv[0] in KINDS else len(KINDS), kv[0])))
    return {"schema": "lcc.checkpoint-info/1", "path": str(path), "step": ident["step"],
            "spec_name": ident["spec"].get("name"), "spec": ident["spec"], "spec_hash": ident.get("spec_hash"),
            "layout": ident["layout"], "lcc_version": ident.get("lcc_version"), "holds": holds, "tensors": tensors}
