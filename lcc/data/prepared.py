"""Training on a prepared dataset (`train.data: {kind: prepared, path: DIR}`, written by `lcc data prepare`):
its tokens memory-mapped, never read whole, and checked against the spec before any rank starts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lcc.data.prepare import ENDS, FORMAT, MANIFEST, MASK, TOKENS


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


def document_ends(folder: Path, wanted: bool) -> np.ndarray | None:
    """Where each document of a prepared dataset ends (documents.bin), when train.data.document_mask asks."""
    return np.fromfile(Path(folder) / ENDS, dtype="<i8") if wanted else None


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


def check_prepared(spec: Any, spec_dir: Path | None, tokenizer: Any) -> None:
    """DataError, naming the field and the folder, unless every prepared folder of the spec (its path or
    blend, and its validation folder) was prepared with the spec's tokenizer, is complete, and holds one
    sequence to train on (and, with train.eval_every, one to validate on)."""
    from lcc.data.stream import DataError, training_part
    from lcc.data.tokenizer import ByteTokenizer
    from lcc.spec.data import prepared_folders, validation_folder

    digest = (None if isinstance(tokenizer, ByteTokenizer)  # the file's text, as lcc data prepare hashed it
              else hashlib.sha256(tokenizer.path.read_text().encode()).hexdigest())
    need, held = spec.train.seq_len + 1, spec.train.data.held_out
    data = spec.train.data
    named = (["train.data.path"] if data.blend is None
             else [f"train.data.blend[{i}].path" for i in range(len(data.blend))])
    val = validation_folder(spec, spec_dir)
    for field, folder in [*zip(named, (f for f, _ in prepared_folders(spec, spec_dir)), strict=True),
                          *([("train.data.validation", val)] if val is not None else [])]:
        why = mismatch(folder, digest, spec.model.vocab_size)
        if why is not None:
            raise DataError(f"{field}: {why}")
        n = manifest(folder)["tokens"]
        if field == "train.data.validation":
            if spec.train.eval_every is not None and n < need:
                raise DataError(f"{field}: the prepared dataset {folder} has {n} tokens, fewer than one sequence of "
                                f"train.seq_len + 1 = {need}")
            continue
        if training_part(n, held) < need:
            raise DataError(f"{field}: the prepared dataset {folder} has {n} tokens, of which "
                            f"{training_part(n, held)} train (the last {held:.0%} are held out), fewer than one "
                            f"sequence of train.seq_len + 1 = {need}: give a longer corpus or a shorter train.seq_len")
        if spec.train.eval_every is not None and val is None and n - training_part(n, held) < need:
            raise DataError(f"train.eval_every: the prepared dataset {folder} holds out {n - training_part(n, held)} "
                            f"tokens (the last {held:.0%}, train.data.held_out) to validate on, fewer than one "
                            f"sequence of train.seq_len + 1 = {need}: give a longer corpus, train.data.validation, a "
                            "shorter train.seq_len, or no train.eval_every")


def prepared_streams(spec: Any, spec_dir: Path | None, seq_len: int, device: Any, validation: bool) -> tuple[Any, Any]:
    """The training stream of a prepared dataset (each folder's first 95%, blended by weight) and, with
    `validation`, the validation stream: train.data.validation's folder whole, else the folders' last 5%,
    blended alike. Each carries its part of a chat dataset's loss mask."""
    from lcc.data.stream import TokenStream, split_corpus
    from lcc.spec.data import prepared_folders, validation_folder

    trains, helds, weights = [], [], []
    documents = spec.train.data.document_mask
    for folder, weight in prepared_folders(spec, spec_dir):
        tokens, mask, ends = prepared_tokens(folder), prepared_mask(folder), document_ends(folder, documents)
        cut = spec.train.data.held_out
        (train, held), (train_mask, held_mask) = (split_corpus(tokens, cut),
                                                  split_corpus(mask, cut) if mask else (None, None))
        trains.append(TokenStream(train, seq_len, device, train_mask, ends))
        helds.append(TokenStream(held, seq_len, device, held_mask, ends, held.start) if validation else None)
        weights.append(weight)
    stream = trains[0] if len(trains) == 1 else BlendedStream(trains, weights)
    if not validation:
        return stream, None
    val = validation_folder(spec, spec_dir)
    if val is not None:
        return stream, TokenStream(prepared_tokens(val), seq_len, device, prepared_mask(val),
                                   document_ends(val, documents))
    return stream, helds[0] if len(helds) == 1 else BlendedStream(helds, weights)


BLOCK = 1024  # a blend's pattern repeats every this many sequences


class BlendedStream:
    """Several token streams as one: of every BLOCK sequences, each stream gives its share by weight (the
    largest remainders rounded up, at least one), interleaved so that each stream's sequences come as evenly
    as they can (the one furthest behind its share goes next); each stream is read in its own order, from
    its first sequence on, so a blend is resumable from the step alone like any stream."""

    def __init__(self, parts: list[Any], weights: list[float]):
        total = sum(weights)
        exact = [w / total * BLOCK for w in weights]
        counts = [max(1, int(x)) for x in exact]
        for i in sorted(range(len(parts)), key=lambda i: int(exact[i]) - exact[i])[:BLOCK - sum(counts)]:
            counts[i] += 1
        while sum(counts) > BLOCK:  # the minimum of one each took more than the block
            counts[counts.index(max(counts))] -= 1
        self.parts, self.counts, self.seq_len = parts, counts, parts[0].seq_len
        taken = [0] * len(parts)
        self.order: list[tuple[int, int]] = []  # (stream, its index within the block) for each position
        for p in range(BLOCK):
            d = max((i for i in range(len(parts)) if taken[i] < counts[i]),
                    key=lambda i: (counts[i] * (p + 1) / BLOCK - taken[i], -i))
            self.order.append((d, taken[d]))
            taken[d] += 1

    def locate(self, i: int) -> tuple[int, int]:
        """Which stream sequence `i` of the blend comes from, and which of its sequences it is."""
        block, p = divmod(i, BLOCK)
        d, within = self.order[p]
        return d, block * self.counts[d] + within

    def _each(self, start: int, count: int, get: str) -> list[Any]:
        return [getattr(self.parts[d], get)(j, 1) for d, j in map(self.locate, range(start, start + count))]

    def sequences(self, start: int, count: int) -> torch.Tensor:
        return torch.cat(self._each(start, count, "sequences"))

    def targets(self, start: int, count: int) -> torch.Tensor | None:
        if all(p.mask is None for p in self.parts):
            return None
        rows = []
        for d, j in map(self.locate, range(start, start + count)):
            mine = self.parts[d].targets(j, 1)  # a stream without a mask trains on every target
            rows.append(mine if mine is not None else
                        torch.ones((1, self.seq_len), dtype=torch.bool, device=self.parts[d].device))
        return torch.cat(rows)

    def segments(self, start: int, count: int) -> torch.Tensor | None:
        if all(p.ends is None for p in self.parts):
            return None
        return torch.cat(self._each(start, count, "segments"))

    def trained(self, start: int, count: int) -> int:
        return sum(self.parts[d].trained(j, 1) for d, j in map(self.locate, range(start, start + count)))
