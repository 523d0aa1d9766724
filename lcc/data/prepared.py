"""Training on a prepared dataset (`train.data: {kind: prepared, path: DIR}`, written by `lcc data prepare`):
its tokens memory-mapped, never read whole, and checked against the spec before any rank starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lcc.data.prepare import FORMAT, MANIFEST, MASK, TOKENS


class MappedTokens:
    """A prepared dataset's tokens (or a stretch of them) as the token stream reads them: only the sequences
    a step takes are read from the file."""

    def __init__(self, path: Path, start: int = 0, stop: int | None = None, array: Any = None, dtype: str = "<i4"):
        self.path = Path(path)
        self.array = array if array is not None else np.memmap(self.path, dtype=dtype, mode="r")
        self.start, self.stop = start, len(self.array) if stop is None else stop

    def numel(self) -> int:
        return self.stop - self.start

    def __getitem__(self, key: slice | torch.Tensor) -> MappedTokens | torch.Tensor:
        if isinstance(key, slice):
            first, last, step = key.indices(self.numel())
            if step != 1:
                raise ValueError("a stretch of a prepared dataset has a step of 1")
            return MappedTokens(self.path, self.start + first, self.start + last, self.array)
        return torch.from_numpy(self.array[self.start + key.numpy()].astype(np.int64))

    def to(self, device: Any) -> MappedTokens:
        return self  # the stream moves the sequences it cuts


def manifest(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / MANIFEST).read_text())


def prepared_tokens(folder: Path) -> MappedTokens:
    return MappedTokens(Path(folder) / TOKENS)


def prepared_mask(folder: Path) -> MappedTokens | None:
    """A chat dataset's loss mask (1: a token trained on as a target), memory-mapped; None for text data."""
    path = Path(folder) / MASK
    return MappedTokens(path, dtype="u1") if path.is_file() else None


def mismatch(folder: Path, tokenizer_sha: str | None, vocab_size: int) -> str | None:
    """Why the prepared dataset in `folder` cannot train this spec's model (its tokenizer, its format, a
    missing or truncated file), or None."""
    try:
        m = manifest(folder)
    except (OSError, ValueError) as exc:
        return f"{folder / MANIFEST} cannot be read ({exc}); prepare it again with lcc data prepare"
    if m.get("format") != FORMAT:
        return f"{folder} was prepared in format {m.get('format')}, this lcc reads {FORMAT}: prepare it again"
    tok = m.get("tokenizer", {})
    mine = tokenizer_sha or "none (one token per byte)"
    theirs = tok.get("sha256") or "none (one token per byte)"
    if theirs != mine or tok.get("vocab_size") != vocab_size:
        return (f"{folder} was tokenized by tokenizer {theirs} (vocabulary {tok.get('vocab_size')}); the spec's model "
                f"uses tokenizer {mine} (vocabulary {vocab_size}): prepare it again with this spec")
    for name, f in m.get("files", {}).items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != f["bytes"]:
            return f"{path}: missing or not the {f['bytes']} bytes its manifest lists; prepare it again"
    return None
