"""Token streams and the data order every layout shares (docs/model.md).

Step s takes sequences [s B, (s + 1) B) of the stream (B = train.global_batch), split in order into
dp * microbatches units; data-parallel rank i processes units [i m, (i + 1) m). Each sequence holds
seq_len + 1 tokens (inputs and next-token targets). The training stream cycles over the corpus but its
last `train.data.held_out` (5% by default), which is held out to validate on.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lcc.data.corpus import BUILTIN_BYTES, builtin_corpus
from lcc.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from lcc.spec.data import data_file
from lcc.spec.models import Spec

HELD_OUT = 0.05
SYNTHETIC_TOKENS = 1 << 20
# a corpus of this many bytes per token it must give holds enough tokens for any tokenizer (byte-level BPE
# tokens average 3-5 bytes of text); a smaller one is tokenized to count them
BYTES_PER_TOKEN_BOUND = 64


class DataError(RuntimeError):
    """The training data cannot be read; the message names the spec field and the file."""


def corpus_tokens(spec: Spec, spec_dir: Path | None = None, tokenizer: Tokenizer | None = None) -> torch.Tensor:
    """The whole corpus as token ids (int64); a prepared dataset's, memory-mapped (lcc.data.prepared). A
    relative `train.data.path` is read from `spec_dir` when given, else from the folder the spec was loaded
    from (lcc.spec.data.data_file). Text becomes ids through `tokenizer` (default: the spec's,
    lcc.data.tokenizer): one per byte, or the model's tokenizer.json."""
    data = spec.train.data
    if data.kind == "prepared":  # memory-mapped, read a sequence at a time (lcc.data.prepared)
        from lcc.data.prepared import prepared_tokens
        from lcc.spec.data import prepared_folders

        return prepared_tokens(prepared_folders(spec, spec_dir)[0][0])
    if data.kind == "builtin":
        raw = builtin_corpus()
    elif data.kind == "text":
        path = data_file(spec, spec_dir)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise DataError(f"train.data.path: cannot read data file {path}: {exc.strerror or exc}") from None
    else:  # synthetic: a seeded first-order Markov chain over the vocabulary, 1M tokens
        return _markov(spec.model.vocab_size, spec.seed, SYNTHETIC_TOKENS)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec, spec_dir)
    if isinstance(tokenizer, ByteTokenizer):
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int64)
    return torch.tensor(tokenizer.encode(raw.decode("utf-8", errors="replace")), dtype=torch.int64)


def _markov(vocab: int, seed: int, n: int) -> torch.Tensor:
    rng = random.Random(seed)
    successors = [[rng.randrange(vocab) for _ in range(4)] for _ in range(vocab)]
    g = torch.Generator().manual_seed(seed)
    choice = torch.randint(0, 4, (n,), generator=g).tolist()
    out, tok = [0] * n, 0
    for i in range(n):
        tok = successors[tok][choice[i]]
        out[i] = tok
    return torch.tensor(out, dtype=torch.int64)


class TokenStream:
    """Sequences of seq_len + 1 tokens, cut one after another from a token array (cycling), on `device`.
    `mask`: a loss mask beside the tokens (a prepared chat dataset's), 1 where a token is trained on as a
    target. `ends`: where each document ends (a prepared dataset's index, counted from the dataset's first
    token; the tokens here start at its `offset`), for attention kept inside documents."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, device: torch.device | None = None, mask: Any = None,
                 ends: Any = None, offset: int = 0):
        if tokens.numel() < seq_len + 1:
            raise ValueError(f"corpus has {tokens.numel()} tokens, fewer than one sequence of {seq_len + 1}")
        self.tokens, self.seq_len, self.device = tokens.to(device) if device else tokens, seq_len, device
        self.mask, self.ends, self.offset = mask, ends, offset

    def _index(self, start: int, count: int) -> torch.Tensor:
        n, L = self.tokens.numel(), self.seq_len
        return (torch.arange(start, start + count).unsqueeze(1) * L + torch.arange(L + 1)) % n

    def sequences(self, start: int, count: int) -> torch.Tensor:
        out = self.tokens[self._index(start, count)]
        return out.to(self.device) if self.device is not None else out

    def targets(self, start: int, count: int) -> torch.Tensor | None:
        """Which targets of those sequences are trained on (bool [count, seq_len]); None: all of them."""
        if self.mask is None:
            return None
        out = self.mask[self._index(start, count)[:, 1:]] != 0
        return out.to(self.device) if self.device is not None else out

    def segments(self, start: int, count: int) -> torch.Tensor | None:
        """The document of each input position of those sequences (int64 [count, seq_len]); None without
        document ends."""
        if self.ends is None:
            return None
        where = self._index(start, count)[:, :-1].numpy() + self.offset
        out = torch.from_numpy(np.searchsorted(self.ends, where, side="right"))
        return out.to(self.device) if self.device is not None else out

    def trained(self, start: int, count: int) -> int:
        """How many targets of those sequences the loss counts."""
        mask = self.targets(start, count)
        return count * self.seq_len if mask is None else int(mask.sum())


def training_part(n_tokens: int, held_out: float = HELD_OUT) -> int:
    """How many of a corpus's `n_tokens` the training stream uses (the first 1 - held_out; train.data.held_out,
    5% by default, is held out)."""
    return int(n_tokens * (1 - held_out))


def split_corpus(tokens: torch.Tensor, held_out: float = HELD_OUT) -> tuple[torch.Tensor, torch.Tensor]:
    cut = training_part(tokens.numel(), held_out)
    return tokens[:cut], tokens[cut:]


def check_corpus(spec: Spec, spec_dir: Path | None = None, tokenizer: Tokenizer | None = None) -> None:
    """Raise DataError, naming the data and both lengths, unless the corpus's training part holds one
    sequence of train.seq_len + 1 tokens: every step cuts its sequences from it, and a launcher checks this
    before any rank starts, where each rank would otherwise fail on its own (TokenStream). `tokenizer`: as
    for `corpus_tokens`; a corpus is tokenized here only when it is small (BYTES_PER_TOKEN_BOUND)."""
    need, held = spec.train.seq_len + 1, spec.train.data.held_out
    data = spec.train.data
    if data.kind == "prepared":  # each folder of it (lcc.data.prepared)
        from lcc.data.prepared import check_prepared

        check_prepared(spec, spec_dir, tokenizer if tokenizer is not None else load_tokenizer(spec, spec_dir))
        return
    if data.kind == "synthetic":
        n, what = SYNTHETIC_TOKENS, "train.data: the synthetic corpus"
    else:
        n, what = _corpus_bytes(spec, spec_dir), "train.data: the built-in corpus"
        if data.kind == "text":
            what = f"train.data.path: data file {data_file(spec, spec_dir)}"
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec, spec_dir)
        if not isinstance(tokenizer, ByteTokenizer):
            if n >= need * BYTES_PER_TOKEN_BOUND / (1 - held):
                return
            n = corpus_tokens(spec, spec_dir, tokenizer).numel()
    if training_part(n, held) < need:
        raise DataError(f"{what} has {n} tokens, of which {training_part(n, held)} train (the last {held:.0%} are "
                        f"held out), fewer than one sequence of train.seq_len + 1 = {need}: give a longer corpus "
                        "or a shorter train.seq_len")
    if spec.train.eval_every is not None and n - training_part(n, held) < need:
        raise DataError(f"train.eval_every: {what.split(': ', 1)[1]} holds out {n - training_part(n, held)} tokens "
                        f"(the last {held:.0%}, train.data.held_out) to validate on, fewer than one sequence of "
                        f"train.seq_len + 1 = {need}: give a longer corpus, a shorter train.seq_len, or no "
                        "train.eval_every")


def _corpus_bytes(spec: Spec, spec_dir: Path | None) -> int:
    if spec.train.data.kind == "builtin":
        return BUILTIN_BYTES
    path = data_file(spec, spec_dir)
    try:
        return path.stat().st_size
    except OSError as exc:
        raise DataError(f"train.data.path: cannot read data file {path}: {exc.strerror or exc}") from None


def streams(spec: Spec, spec_dir: Path | None, tokenizer: Tokenizer, seq_len: int, device: torch.device,
            validation: bool) -> tuple[TokenStream, TokenStream | None]:
    """The training stream (the first 95% of the corpus) and, with `validation`, the held-out one (a prepared
    dataset's: lcc.data.prepared.prepared_streams)."""
    if spec.train.data.kind == "prepared":
        from lcc.data.prepared import prepared_streams

        return prepared_streams(spec, spec_dir, seq_len, device, validation)
    train, held_out = split_corpus(corpus_tokens(spec, spec_dir, tokenizer), spec.train.data.held_out)
    return TokenStream(train, seq_len, device), TokenStream(held_out, seq_len, device) if validation else None


def rank_units(stream: TokenStream, data: Any, dp: int, batch: int) -> list[tuple[Any, ...]]:
    """dp rank `dp`'s units of global batch `batch` (the plan's data: dp x microbatches units a batch):
    (inputs, targets, segments), inputs and targets [sequences, seq_len]; a target the loss mask leaves out
    is -1 (the programs' cross-entropy counts only targets >= 0); segments: each input position's document
    (train.data.document_mask), else None."""
    tokens = units_of_step(stream, data.global_batch, data.units_per_step, batch)
    first = batch * data.global_batch

    def cut(t: torch.Tensor | None) -> list[Any]:
        return list(t.chunk(data.units_per_step)) if t is not None else [None] * len(tokens)

    mine = slice(dp * data.microbatches, (dp + 1) * data.microbatches)
    masks, segments = cut(stream.targets(first, data.global_batch)), cut(stream.segments(first, data.global_batch))
    return [(u[:, :-1], u[:, 1:] if m is None else u[:, 1:].masked_fill(~m, -1), s)
            for u, m, s in zip(tokens[mine], masks[mine], segments[mine], strict=True)]


def step_units(stream: TokenStream, spec: Spec, step: int) -> list[torch.Tensor]:
    """The dp * microbatches units of optimizer step `step`, in order; each (B / units) x (seq_len + 1)."""
    par = spec.parallelism
    return units_of_step(stream, spec.train.global_batch, par.dp * par.pipeline.microbatches, step)


def units_of_step(stream: TokenStream, global_batch: int, n_units: int, step: int) -> list[torch.Tensor]:
    """Step `step`'s sequences [step B, (step + 1) B) cut in order into `n_units` units."""
    return list(stream.sequences(step * global_batch, global_batch).chunk(n_units))
