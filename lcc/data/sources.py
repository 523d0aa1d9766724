"""Documents out of a user's files, for `lcc data prepare`: JSON Lines, Parquet, Arrow (a Hugging Face dataset
saved with `save_to_disk`) and plain text, or folders of them.

A source path is a file or a folder (its files of the known kinds, recursively, in name order). The work is
cut into pieces that processes can take on their own, each naming where it reads: a JSON Lines file in runs
of whole lines (about PIECE_BYTES each), a Parquet file by row group, an Arrow file (the IPC streams a
Hugging Face dataset's `save_to_disk` writes) whole, read a record batch at a time, a text file whole (one
document). A
piece yields its documents in order: a text (`--text-field`, default `text`) or, in chat mode, a list of
messages (`messages`: {role, content}). What cannot be read is a DataError naming the file (and line, or
field) before anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JSONL = (".jsonl", ".json", ".ndjson")
PARQUET = (".parquet",)
ARROW = (".arrow",)
TEXT = (".txt", ".text", ".md")
PIECE_BYTES = 8 << 20  # a JSON Lines file is cut into runs of whole lines of about this many bytes


class SourceError(ValueError):
    """A source that cannot be read: the message names the file, and the line or field."""


@dataclass(frozen=True)
class Piece:
    path: str
    kind: str  # jsonl | parquet | text
    start: int = 0  # jsonl: byte offset of the first line; parquet: row group
    end: int = 0  # jsonl: byte offset after the last line
    first_line: int = 1  # jsonl: the line number at `start`


def source_files(sources: list[Path]) -> list[Path]:
    """The files of the source paths, in order; SourceError for a path that does not exist or a file of a
    kind lcc does not read."""
    out: list[Path] = []
    for src in sources:
        src = Path(src)
        if src.is_dir():
            if (src / "dataset_dict.json").is_file():
                splits = sorted(p.name for p in src.iterdir() if (p / "state.json").is_file())
                raise SourceError(f"{src}: a Hugging Face DatasetDict; give the folder of one of its splits "
                                  f"({', '.join(splits)})")
            known = JSONL + PARQUET + ARROW + TEXT
            found = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in known
                           and not (p.suffix.lower() == ".json" and (p.parent / "state.json").is_file()))
            # (a Hugging Face dataset's folder: its Arrow files, not its state and info)
            if not found:
                raise SourceError(f"{src}: no .jsonl, .parquet, .arrow or .txt files in this folder")
            out += found
        elif src.is_file():
            if src.suffix.lower() not in JSONL + PARQUET + ARROW + TEXT:
                raise SourceError(f"{src}: not a file lcc reads (.jsonl, .json, .parquet, .arrow, .txt, .md)")
            out.append(src)
        else:
            raise SourceError(f"{src}: no such file or folder")
    return out


def pieces_of(path: Path) -> list[Piece]:
    suffix = path.suffix.lower()
    if suffix in TEXT:
        return [Piece(str(path), "text")]
    if suffix in PARQUET:
        groups = _parquet(path).metadata.num_row_groups
        return [Piece(str(path), "parquet", g) for g in range(groups)]
    if suffix in ARROW:
        return [Piece(str(path), "arrow")]
    size, out, start, line = path.stat().st_size, [], 0, 1
    with open(path, "rb") as f:
        while start < size:
            f.seek(min(size, start + PIECE_BYTES))
            f.readline()  # to the end of the line the cut falls in
            end = min(size, f.tell()) if start + PIECE_BYTES < size else size
            out.append(Piece(str(path), "jsonl", start, end, line))
            f.seek(start)
            line += f.read(end - start).count(b"\n")
            start = end
    return out


def _parquet(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SourceError(f"{path}: reading Parquet needs pyarrow: pip install 'lcc[data]'") from None
    try:
        return pq.ParquetFile(str(path))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own types
        raise SourceError(f"{path}: not a Parquet file pyarrow reads ({exc})") from None


def documents(piece: Piece, field: str, chat: bool) -> Iterator[Any]:
    """The piece's documents in order: texts, or (chat) lists of messages."""
    if piece.kind == "text":
        try:
            yield Path(piece.path).read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SourceError(f"{piece.path}: not UTF-8 text (byte {exc.start})") from None
        return
    if piece.kind == "arrow":
        yield from _arrow(piece, field, chat)
        return
    if piece.kind == "parquet":
        table = _parquet(Path(piece.path)).read_row_group(piece.start)
        if field not in table.column_names:
            raise SourceError(f"{piece.path}: no column {field!r} (its columns: {', '.join(table.column_names)})")
        for row, value in enumerate(table.column(field).to_pylist()):
            yield _checked(value, chat, f"{piece.path}: row group {piece.start}, row {row}: {field!r}")
        return
    with open(piece.path, "rb") as f:
        f.seek(piece.start)
        data = f.read(piece.end - piece.start)
    for n, line in enumerate(data.split(b"\n"), start=piece.first_line):
        if not line.strip():
            continue
        where = f"{piece.path}:{n}"
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SourceError(f"{where}: not a JSON object ({exc})") from None
        if not isinstance(record, dict):
            raise SourceError(f"{where}: a JSON {type(record).__name__}, not an object")
        if field not in record:
            raise SourceError(f"{where}: no field {field!r} (its fields: {', '.join(sorted(record)) or 'none'})")
        yield _checked(record[field], chat, f"{where}: {field!r}")


def _arrow(piece: Piece, field: str, chat: bool) -> Iterator[Any]:
    try:
        import pyarrow as pa
    except ImportError:
        raise SourceError(f"{piece.path}: reading Arrow needs pyarrow: pip install 'lcc[data]'") from None
    try:
        stream = pa.ipc.open_stream(piece.path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own types
        raise SourceError(f"{piece.path}: not an Arrow stream pyarrow reads ({exc})") from None
    if field not in stream.schema.names:
        raise SourceError(f"{piece.path}: no column {field!r} (its columns: {', '.join(stream.schema.names)})")
    row = 0
    for batch in stream:
        for value in batch.column(field).to_pylist():
            yield _checked(value, chat, f"{piece.path}: row {row}: {field!r}")
            row += 1


def _checked(value: Any, chat: bool, where: str) -> Any:
    if not chat:
        if not isinstance(value, str):
            raise SourceError(f"{where} is {type(value).__name__}, not text")
        return value
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise SourceError(f"{where}: a chat record's messages are a list of {{role, content}} objects")
    return value
