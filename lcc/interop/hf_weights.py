"""Hugging Face safetensors weights into lcc checkpoints and back, one tensor at a time.

Import writes an lcc checkpoint (torch.distributed.checkpoint, layout-free keys, lcc-checkpoint.json) that
`lcc run train --init-from`, `lcc run generate --checkpoint` and `lcc run serve --checkpoint` load under any
layout of the spec. DCP asks for each block when it writes it (`LazyBlocks`), and each block is its own file,
so no more than one tensor (one expert's matrix, or one dense weight) is in memory at a time.

Export reads an lcc checkpoint (saved by training or by import) one layer at a time and writes safetensors
shards tensor by tensor (`write_safetensors`), one tensor per expert as `save_pretrained` writes them, with
a config.json that transformers loads.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import MetadataIndex

from lcc.interop.hf_config import ImportRefused, hf_config
from lcc.interop.hf_files import write_model_files, write_text_atomically
from lcc.interop.hf_names import Part, dense_names, expert_parts, fused_prefix, moe_prefix, to_hf_heads, to_lcc_heads
from lcc.model import build_model
from lcc.model.build import is_expert_param
from lcc.runtime import checkpoint
from lcc.runtime.checkpoint_dir import resolve
from lcc.runtime.checkpoint_files import IDENTITY, CheckpointError, write_synced, written_files
from lcc.runtime.checkpoint_identity import identity, read_identity
from lcc.runtime.checkpoint_layout import Blocks
from lcc.runtime.checkpoint_verify import verify
from lcc.runtime.model_files import copy_into, hf_files
from lcc.spec import resolved
from lcc.spec.models import Spec

TOKENIZER = "tokenizer.json"  # an imported checkpoint keeps the model's tokenizer beside its tensors
ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16", torch.float16: "F16"}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


class SafetensorsSource:
    """The tensors of a model folder: `model.safetensors`, or the shards a `model.safetensors.index.json`
    lists. Each file is opened once (safetensors reads its header); a tensor, or one row of it, is read only
    when asked for, with safetensors' `pread` backend: no memory map, so that only the bytes asked for are
    read and what was read leaves memory with the tensor. The files close when the source is dropped."""

    def __init__(self, model_dir: Path):
        self.dir, self._files = Path(model_dir), {}
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ImportRefused(f"{index}: not a safetensors index ({exc})") from None
            self.where = {name: self.dir / file for name, file in weight_map.items()}
        else:
            single = self.dir / "model.safetensors"
            if not single.is_file():
                raise ImportRefused(f"{self.dir}: no model.safetensors or model.safetensors.index.json")
            self.where = {name: single for name in self._open(single)[1]}

    def _open(self, path: Path) -> tuple[Any, set[str]]:
        """(the open file, the names of its tensors)."""
        if path not in self._files:
            try:
                f = safe_open(str(path), framework="pt", backend="pread")
                self._files[path] = (f, set(f.keys()))
            except (OSError, SafetensorError) as exc:
                raise ImportRefused(f"{path}: not a readable safetensors file ({exc})") from None
        return self._files[path]

    def _slice(self, name: str) -> tuple[Path, Any]:
        """(the file of tensor `name`, its safetensors slice: dtype, shape, and the bytes on demand)."""
        path = self.where[name]
        f, names = self._open(path)
        if name not in names:
            raise ImportRefused(f"{path}: has no tensor {name}, which its index places there")
        part = f.get_slice(name)
        if part.get_dtype() not in ST_NAMES:
            raise ImportRefused(f"{path}: {name} is {part.get_dtype()}; lcc reads F32, F64, BF16 and F16 weights")
        return path, part

    def find(self, name: str) -> str | None:
        """`name`, or its transformers 5 spelling (Mixtral's block_sparse_moe is mlp there)."""
        for candidate in (name, name.replace(".block_sparse_moe.", ".mlp.")):
            if candidate in self.where:
                return candidate
        return None

    def shape(self, name: str) -> list[int]:
        return list(self._slice(name)[1].get_shape())

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        """Tensor `name`, or its row `index` along dim 0."""
        path, part = self._slice(name)
        try:
            return self._open(path)[0].get_tensor(name) if index is None else part[index]
        except SafetensorError as exc:
            raise ImportRefused(f"{path}: {name} cannot be read ({exc})") from None


class LazyBlocks(Blocks):
    """Blocks of a global tensor that are read from their source only when DCP writes them."""

    _loaders: dict[torch.Size, tuple[torch.Size, Callable[[], torch.Tensor]]]

    @staticmethod
    def __new__(cls, size, dtype, loaders):  # noqa: ANN001, ANN205 - as Blocks
        r = torch.Tensor._make_wrapper_subclass(cls, torch.Size(size), dtype=dtype, device="cpu")
        r._blocks = {}
        r._loaders = {torch.Size(o): (torch.Size(s), fn) for o, s, fn in loaders}
        return r

    def _chunk_list(self):  # noqa: ANN202 - DCP's types
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        return [ChunkStorageMetadata(offsets=o, sizes=s) for o, (s, _) in self._loaders.items()]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        size, fn = self._loaders[torch.Size(index.offset or ())]
        t = fn()
        if tuple(t.shape) != tuple(size):
            raise ImportRefused(f"{index.fqn}: a block of shape {tuple(t.shape)} where {tuple(size)} was expected")
        return t.to(self.dtype).contiguous()


def _expert_layout(src: SafetensorsSource, family: str, layer: int) -> bool:
    """True when layer `layer`'s experts are fused stacks, False when one tensor per expert; refused if neither."""
    if src.find(f"{fused_prefix(layer)}.gate_up_proj") is not None:
        return True
    first = f"{moe_prefix(family, layer)}.experts.0."
    if src.find(first + ("w1" if family == "mixtral" else "gate_proj") + ".weight") is not None:
        return False
    raise ImportRefused(f"{src.dir}: no experts for layer {layer} (neither {first}* nor "
                        f"{fused_prefix(layer)}.gate_up_proj)")


def _loader(src: SafetensorsSource, part: Part, block: tuple[int, ...], expect: list[int]
            ) -> Callable[[], torch.Tensor]:
    """Reads `part` as a block of shape `block`; the checkpoint tensor must have shape `expect`."""
    name = src.find(part.name)
    if name is None:
        raise ImportRefused(f"{src.dir}: the checkpoint has no tensor {part.name}")
    if src.shape(name) != expect:
        raise ImportRefused(f"{src.where[name]}: {name} has shape {src.shape(name)}; the spec needs {expect}")

    def load() -> torch.Tensor:
        t = src.read(name, part.index)
        if part.rows is not None:
            t = t[part.rows[0]:part.rows[1]]
        if part.heads is not None:
            t = to_lcc_heads(t, part.heads)
        return t.reshape(block)

    return load


def import_weights(model_dir: Path, spec: Spec, family: str, out: Path) -> dict[str, Any]:
    """Write the lcc checkpoint of the safetensors weights in `model_dir` for `spec` into folder `out`
    (written as `out.tmp`, renamed when complete). Returns what was converted."""
    src = SafetensorsSource(model_dir)
    dtype = torch.float64 if spec.train.dtype == "float64" else torch.float32  # the checkpoints' master dtype
    att, moe = spec.model.attention, spec.model.moe
    model = build_model(spec, device="meta")
    state: dict[str, Any] = {"meta/step": torch.tensor(0, dtype=torch.int64)}
    used: set[str] = set()
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        if is_expert_param(name):
            layer = int(name.split(".")[1])
            fused = _expert_layout(src, family, layer)
            parts = expert_parts(family, name, moe.n_experts, moe.expert_d_ff, fused)
            block = (1, *shape[1:])
            if not fused:
                expect = list(shape[1:])
            elif name.endswith("w2_EDF"):
                expect = list(shape)
            else:  # gate_up_proj: [E, 2F, D]
                expect = [shape[0], 2 * shape[1], shape[2]]
            loaders = [(part.offset, block, _loader(src, part, block, expect)) for part in parts]
        else:
            parts = dense_names(family, name, att.qk_norm, att.head_dim, spec.model.tie_embeddings)
            if parts is None:  # a router's centroids (one group: its affinity never changes a choice), zero
                state[f"model/{name}"] = torch.zeros(shape, dtype=dtype)
                continue
            loaders = [(part.offset, shape, _loader(src, part, shape, list(shape))) for part in parts]
        used.update(src.find(part.name) for part in parts)
        state[f"model/{name}"] = LazyBlocks(shape, dtype, loaders)
    for name, b in model.named_buffers():
        state[f"bias/{name}"] = torch.zeros(tuple(b.shape), dtype=b.dtype)
    unused = sorted(n for n in src.where if n not in used and not _tied_copy(n, spec))
    if unused:
        raise ImportRefused(f"{src.where[unused[0]]}: tensor {unused[0]} has no place in the spec"
                            f"{f' (and {len(unused) - 1} more)' if len(unused) > 1 else ''}")
    out = Path(out)
    tmp = _new_folder_beside(out)
    try:
        with checkpoint.single_process_quiet():
            try:
                dcp.save(state, storage_writer=FileSystemWriter(str(tmp), single_file_per_rank=False), no_dist=True)
            except CheckpointException as exc:  # one process: one failure, a loader's refusal or a failed write
                error = next(iter(exc.failures.values()))[0]
                if isinstance(error, ImportRefused):
                    raise error from None
                message = f"{out}: writing the checkpoint failed:\n{checkpoint.failures_text(exc)}"
                raise CheckpointError(message + checkpoint.disk_full_note(out.parent, message)) from None
        copy_into(tmp, hf_files(model_dir))  # what lcc does not read into the spec, for an export to write back
        tokenizer = Path(model_dir) / TOKENIZER
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, tmp / TOKENIZER)
        ident = {**identity(resolved(spec), 0),
                 "imported_from": {"format": "huggingface", "family": family},
                 "files": dict(sorted(written_files(tmp).items()))}
        write_synced(tmp / IDENTITY, json.dumps(ident, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the folder this call made, never one that was there
        raise
    return {"tensors": len(used), "parameters": sum(p.numel() for p in model.parameters())}


def _new_folder_beside(out: Path) -> Path:
    """A new, empty folder beside `out` (`<out>.tmp-<random>`), to be renamed to `out` once complete: on the
    same file system, and never a folder the user (or another import into `out`) has there."""
    while True:
        tmp = out.with_name(f"{out.name}.tmp-{secrets.token_hex(4)}")
        try:
            tmp.mkdir(parents=True)
            return tmp
        except FileExistsError:
            continue


def _tied_copy(name: str, spec: Spec) -> bool:
    """transformers may save a tied LM head as its own tensor; lcc keeps the embedding only."""
    return spec.model.tie_embeddings and name == "lm_head.weight"


# --------------------------------------------------------------------------------------------- export
def write_safetensors(path: Path, tensors: list[tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]],
                      metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written as it is read: the header (names, dtypes, shapes, offsets) first, from
    what is declared, then each tensor's bytes as its loader gives it, so one tensor is in memory at a time.
    Written here rather than with `safetensors.torch.save_file`, which takes every tensor at once (a dict of
    tensors in memory): a shard of a large model would then be in memory whole. The format is the one
    safetensors reads (an 8-byte little-endian header length, the JSON header padded to 8 bytes, the data)."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape, _ in tensors:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, dtype, shape, load in tensors:
            t = load().to(dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: {tuple(t.shape)} where {tuple(shape)} was declared")
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    os.replace(tmp, path)


def _hf_tensors(spec: Spec, family: str) -> Iterator[tuple[str, list[tuple[str, Part, tuple[int, ...]]]]]:
    """Per group (the embedding, each layer, the final norm and head): (lcc parameter, its part, the HF
    tensor's shape) for every HF tensor of the group, in the order save_pretrained writes them."""
    att, moe = spec.model.attention, spec.model.moe
    model = build_model(spec, device="meta")
    groups: dict[str, list[tuple[str, Part, tuple[int, ...]]]] = {}
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        group = ".".join(name.split(".")[:2]) if name.startswith("layers.") else "top"
        if is_expert_param(name):
            for part in expert_parts(family, name, moe.n_experts, moe.expert_d_ff, fused=False):
                groups.setdefault(group, []).append((name, part, shape[1:]))
            continue
        parts = dense_names(family, name, att.qk_norm, att.head_dim, spec.model.tie_embeddings)
        for part in parts or []:
            groups.setdefault(group, []).append((name, part, shape))
    yield from groups.items()


def _read_lcc(path: Path, names: list[str], spec: Spec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    model = build_model(spec, device="meta")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    state = {f"model/{n}": torch.empty(shapes[n], dtype=dtype) for n in names}
    checkpoint.load(path, state)
    return {n: state[f"model/{n}"] for n in names}


def export_weights(ckpt: Path, out: Path, max_shard_bytes: int = 2 << 30, tokenizer: Path | None = None
                   ) -> dict[str, Any]:
    """Write the Hugging Face model folder (config.json, safetensors shards and their index, and the
    tokenizer when there is one) of lcc checkpoint `ckpt` into `out`."""
    folder = resolve(Path(ckpt))
    ident = read_identity(folder)
    verify(folder, ident)
    spec = Spec.model_validate(ident["spec"])
    family, config = hf_config(spec)
    dtype = EXPORT_DTYPES[spec.train.dtype]
    master = torch.float64 if spec.train.dtype == "float64" else torch.float32
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, list[tuple[str, Part, tuple[int, ...]]]]]] = [[]]
    size = 0
    for group, entries in _hf_tensors(spec, family):
        group_bytes = sum(math.prod(s) * dtype.itemsize for _, _, s in entries)
        if shards[-1] and size + group_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((group, entries))
        size += group_bytes
    weight_map, total = {}, 0
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        names = ["model.safetensors"]
    for file, shard in zip(names, shards, strict=True):
        tensors = []
        for _, entries in shard:
            cache: dict[str, Any] = {"left": len(entries)}
            wanted = sorted({n for n, _, _ in entries})

            def value(lcc_name: str, part: Part, wanted=wanted, cache=cache) -> torch.Tensor:
                # one group (a layer) of the checkpoint in memory: read when its first tensor is written,
                # dropped after its last
                if "v" not in cache:
                    cache["v"] = _read_lcc(folder, wanted, spec, master)
                t = cache["v"][lcc_name]
                cache["left"] -= 1
                if not cache["left"]:
                    del cache["v"]
                t = t[part.offset[0]] if len(part.offset) == 3 else t
                return to_hf_heads(t, part.heads) if part.heads is not None else t

            for lcc_name, part, shape in entries:
                tensors.append((part.name, dtype, shape, lambda n=lcc_name, p=part, f=value: f(n, p)))
                weight_map[part.name] = file
                total += math.prod(shape) * dtype.itemsize
        write_safetensors(out / file, tensors)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_text_atomically(out / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    written = write_model_files(out, folder, spec, config, tokenizer)
    return {"family": family, "files": names, "tensors": len(weight_map), "bytes": total, **written}
