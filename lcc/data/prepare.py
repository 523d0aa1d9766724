"""`lcc data prepare`: a user's documents tokenized once into a folder training reads without loading it whole.

    tokens.bin       every document's token ids, one after another (int32, little-endian)
    documents.bin    where each document ends in tokens.bin (int64, cumulative)
    loss_mask.bin    chat mode: 1 for the tokens of assistant turns, 0 elsewhere (uint8, one per token)
    manifest.json    the sources (path, bytes, sha256), the tokenizer's sha256, the options, the counts, and
                     each file's bytes and sha256

Text documents are tokenized without the tokenizer's special tokens and end with the model's end-of-sequence
id (the spec's first `serve.stop_token_ids`) where it has one; a byte-level model has none, and its
documents are told apart by documents.bin alone. In chat mode each record's messages are rendered with the
model's chat template (lcc's own format for a byte-level model) and the tokens of each assistant turn (its
content and what the template closes it with) are marked in the loss mask.

The sources are cut into pieces (lcc.data.sources) that `workers` processes tokenize in parallel; the
results are joined in source order, so the output is the same whatever the number of workers. Everything is
written into a new folder beside `out` and renamed over it once complete: an interrupted or failed run
leaves `out` as it was. Running again on the same inputs with the same tokenizer and options does nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from lcc.data.sources import Piece, SourceError, documents, pieces_of, source_files

FORMAT = 1
MANIFEST = "manifest.json"
TOKENS, ENDS, MASK = "tokens.bin", "documents.bin", "loss_mask.bin"


class PrepareError(ValueError):
    """Data that cannot be prepared: the message names the file, and the line or field."""


@dataclass(frozen=True)
class Encoder:
    """How a worker turns documents into ids (picklable: each process builds its own tokenizer)."""

    vocab_size: int
    tokenizer: str | None  # a tokenizer.json; None: one token per byte
    eos: int | None
    chat: bool
    template: dict[str, Any] | None  # a chat template (lcc.data.chat_template.find), chat mode only

    def load(self) -> Any:
        from lcc.data.tokenizer import ByteTokenizer, HFTokenizer

        return HFTokenizer(Path(self.tokenizer), self.vocab_size) if self.tokenizer else ByteTokenizer(self.vocab_size)

    def text(self, tok: Any, text: str) -> tuple[list[int], None]:
        ids = tok.encode(text, special=False)
        return (ids + [self.eos] if self.eos is not None else ids), None

    def conversation(self, tok: Any, template: Any, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
        """The rendered conversation's ids, and 1 for each token of an assistant turn."""
        text, spans = render_chat(template, messages)
        ids, starts = _with_offsets(tok, text)
        mask = [int(any(a <= s < b for a, b in spans)) for s in starts]
        return ids, mask


def render_chat(template: Any, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and each assistant turn's [start, end) in characters: from where the prompt
    before it (with the generation prompt) ends to where the conversation through it ends."""
    if template is None:  # lcc's own format (lcc.serve.api): a line <|role|>, the content and a newline
        parts, spans, at = [], [], 0
        for m in messages:
            head = f"<|{m['role']}|>\n"
            body = f"{m['content']}\n"
            if m["role"] == "assistant":
                spans.append((at + len(head), at + len(head) + len(body)))
            parts.append(head + body)
            at += len(head) + len(body)
        return "".join(parts), spans
    text = template.render(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True)
        through = template.render(messages[:i + 1], add_generation_prompt=False)
        if not text.startswith(before) or not text.startswith(through):
            raise SourceError(f"the chat template does not render the conversation turn by turn (message {i}): "
                              "its assistant turns cannot be told apart")
        spans.append((len(before), len(through)))
    return text, spans


def _with_offsets(tok: Any, text: str) -> tuple[list[int], list[int]]:
    """Ids of `text` without special tokens added, and the character where each begins."""
    from lcc.data.tokenizer import ByteTokenizer

    if isinstance(tok, ByteTokenizer):
        ids = tok.encode(text)
        return ids, [i for i, ch in enumerate(text) for _ in ch.encode()]
    enc = tok._tok.encode(text, add_special_tokens=False)
    return list(enc.ids), [a for a, _ in enc.offsets]


_LOADED: dict[str, tuple[Any, Any]] = {}


def _loaded(enc: Encoder) -> tuple[Any, Any]:
    """The tokenizer and chat template of `enc`, loaded once per process (a worker takes many pieces)."""
    key = json.dumps([enc.vocab_size, enc.tokenizer, enc.chat, enc.template], sort_keys=True)
    if key not in _LOADED:
        template = None
        if enc.chat and enc.template is not None:
            from lcc.data.chat_template import ChatTemplate

            template = ChatTemplate(enc.template)
        _LOADED[key] = (enc.load(), template)
    return _LOADED[key]


def _work(job: tuple[Encoder, Piece, str, str]) -> tuple[list[int], int]:
    """One piece: its documents' ids (and loss mask) written to `out`(.mask); returns each document's
    length and the piece's bytes read."""
    enc, piece, field, out = job
    tok, template = _loaded(enc)
    lengths, ids_all, mask_all = [], [], []
    for doc in documents(piece, field, enc.chat):
        try:
            ids, mask = enc.conversation(tok, template, doc) if enc.chat else enc.text(tok, doc)
        except ValueError as exc:  # a token outside the vocabulary, a template that refuses the messages
            raise SourceError(f"{piece.path}: {exc}") from None
        lengths.append(len(ids))
        ids_all += ids
        if mask is not None:
            mask_all += mask
    np.asarray(ids_all, dtype="<i4").tofile(out)
    if enc.chat:
        np.asarray(mask_all, dtype=np.uint8).tofile(out + ".mask")
    return lengths, (piece.end - piece.start) if piece.kind == "jsonl" else 0


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def inputs_of(files: list[Path], enc: Encoder, field: str, tokenizer_sha: str | None) -> dict[str, Any]:
    """What decides the output: the sources, the tokenizer, the options."""
    return {"format": FORMAT,
            "sources": [{"path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": sha256(p)} for p in files],
            "tokenizer": {"sha256": tokenizer_sha, "vocab_size": enc.vocab_size},
            "mode": "chat" if enc.chat else "text", "text_field": field, "eos": enc.eos,
            "chat_template_sha256": (hashlib.sha256(json.dumps(enc.template, sort_keys=True).encode()).hexdigest()
                                     if enc.chat and enc.template is not None else None)}


def prepare(sources: list[Path], enc: Encoder, tokenizer_sha: str | None, out: Path, field: str = "text",
            workers: int = 1, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Prepare `sources` into `out`; returns the manifest, with "unchanged": True where `out` already held
    this preparation. PrepareError for unreadable input (nothing written)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and _manifest(out) is None)):
        raise PrepareError(f"{out} exists and is not a prepared dataset (no {MANIFEST}); choose another --out")
    try:
        files = source_files([Path(s) for s in sources])
        wanted = inputs_of(files, enc, field, tokenizer_sha)
        old = _manifest(out)
        if old is not None and {k: old.get(k) for k in wanted} == wanted and _intact(out, old):
            return {**old, "unchanged": True}
        pieces = [p for f in files for p in pieces_of(f)]
    except SourceError as exc:
        raise PrepareError(str(exc)) from None
    tmp = out.with_name(f"{out.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir(parents=True)
    try:
        lengths = _run(pieces, enc, field, tmp, workers, progress)
        manifest = _join(tmp, len(pieces), lengths, enc, wanted)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**manifest, "unchanged": False}


def _run(pieces: list[Piece], enc: Encoder, field: str, tmp: Path, workers: int,
         progress: Callable[[int, int], None] | None) -> list[list[int]]:
    jobs = [(enc, p, field, str(tmp / f"piece-{i:06d}")) for i, p in enumerate(pieces)]
    out = []
    try:
        if workers <= 1 or len(jobs) == 1:
            for i, job in enumerate(jobs):
                out.append(_work(job)[0])
                if progress:
                    progress(i + 1, len(jobs))
        else:
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=get_context("spawn")) as pool:
                for i, (lengths, _) in enumerate(pool.map(_work, jobs)):
                    out.append(lengths)
                    if progress:
                        progress(i + 1, len(jobs))
    except SourceError as exc:
        raise PrepareError(str(exc)) from None
    return out


def _join(tmp: Path, n: int, lengths: list[list[int]], enc: Encoder, wanted: dict[str, Any]) -> dict[str, Any]:
    """The pieces' files joined into tokens.bin (and loss_mask.bin), documents.bin, and the manifest."""
    ends = np.cumsum(np.asarray([x for piece in lengths for x in piece], dtype=np.int64), dtype=np.int64)
    if ends.size == 0 or ends[-1] == 0:
        raise PrepareError("the sources hold no documents" if ends.size == 0 else "the sources' documents are empty")
    for name, suffix in ((TOKENS, ""), *(((MASK, ".mask"),) if enc.chat else ())):
        with open(tmp / name, "wb") as joined:
            for i in range(n):
                piece = tmp / f"piece-{i:06d}{suffix}"
                with open(piece, "rb") as f:
                    shutil.copyfileobj(f, joined, 1 << 20)
                piece.unlink()
    ends.astype("<i8").tofile(tmp / ENDS)
    manifest = {**wanted, "tokens": int(ends[-1]), "documents": int(ends.size),
                "files": {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256(tmp / name)}
                          for name in sorted(os.listdir(tmp))}}
    if enc.chat:
        manifest["masked_in_tokens"] = int(np.fromfile(tmp / MASK, dtype=np.uint8).sum(dtype=np.int64))
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def _manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _intact(folder: Path, manifest: dict[str, Any]) -> bool:
    """The prepared files are there with the sizes the manifest lists."""
    return all((folder / n).is_file() and (folder / n).stat().st_size == f["bytes"]
               for n, f in manifest.get("files", {}).items())


def _publish(tmp: Path, out: Path) -> None:
    """`tmp` becomes `out`; an `out` that was there (an earlier preparation) is removed only after."""
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{secrets.token_hex(4)}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
