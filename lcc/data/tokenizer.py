"""Text in and out of token ids: one token per byte (the specs' corpus and vocabulary), or a model's own
Hugging Face `tokenizer.json` (`model.tokenizer`, e.g. an imported model's) through the `tokenizers` package.

Generated tokens are decoded incrementally (`decoder()`): text is shown once it is complete, never a
character split over tokens, and what is still open comes out at the end (`final`).
"""

from __future__ import annotations

import codecs
import hashlib
import json
from pathlib import Path
from typing import Protocol

from lcc.spec.data import spec_folder
from lcc.spec.errors import Problem, SpecError
from lcc.spec.load import locate
from lcc.spec.models import Spec

PLAN_FILE = "tokenizer.json"  # a plan folder's copy of the spec's tokenizer
FIELD = ("model", "tokenizer")


class TokenizerError(ValueError):
    """A tokenizer file that cannot be read, or text the model's vocabulary cannot hold."""


class Decoder(Protocol):
    def add(self, token: int) -> str: ...

    def final(self) -> str: ...


class ByteTokenizer:
    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, special: bool = True) -> list[int]:  # bytes: no special tokens to add
        ids = list(text.encode("utf-8"))
        too_big = [i for i in ids if i >= self.vocab_size]
        if too_big:
            raise TokenizerError(f"the text has byte {too_big[0]}, outside the model's vocabulary of "
                                 f"{self.vocab_size}")
        return ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def decoder(self) -> Decoder:
        return _ByteDecoder()


class _ByteDecoder:
    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        return self._utf8.decode(bytes([token]) if token < 256 else b"")

    def final(self) -> str:
        return self._utf8.decode(b"", final=True)


class HFTokenizer:
    """A `tokenizer.json`: encoding adds the special tokens its post-processor adds (as transformers'
    tokenizers do by default); decoding skips special tokens."""

    def __init__(self, path: Path, vocab_size: int):
        try:
            from tokenizers import Tokenizer
        except ImportError:  # pragma: no cover - a dependency of lcc
            raise TokenizerError("reading a tokenizer.json needs the tokenizers package: pip install tokenizers"
                                 ) from None
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises its own exception types
            raise TokenizerError(f"{path}: not a tokenizer.json the tokenizers package reads ({exc})") from None
        self.path, self.vocab_size = Path(path), vocab_size

    def encode(self, text: str, special: bool = True) -> list[int]:
        """`special`: add the special tokens the post-processor adds (a chat template writes its own)."""
        ids = self._tok.encode(text, add_special_tokens=special).ids
        too_big = [i for i in ids if i >= self.vocab_size]
        if too_big:
            raise TokenizerError(f"{self.path}: token {too_big[0]} is outside the model's vocabulary of "
                                 f"{self.vocab_size}")
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def decoder(self) -> Decoder:
        return _WindowDecoder(self)


class _WindowDecoder:
    """Incremental decoding over a short window: the text of the tokens since the last complete piece is
    decoded again with each new token, and the new part is emitted once it does not end in a replacement
    character (an incomplete byte sequence)."""

    def __init__(self, tok: HFTokenizer):
        self._tok, self._ids = tok, []
        self._prefix = 0  # where the window starts (its first tokens give the context of the rest)
        self._read = 0  # tokens up to here have been emitted

    def add(self, token: int) -> str:
        self._ids.append(token)
        done = self._tok.decode(self._ids[self._prefix:self._read])
        text = self._tok.decode(self._ids[self._prefix:])
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done):]

    def final(self) -> str:
        done = self._tok.decode(self._ids[self._prefix:self._read])
        text = self._tok.decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(done):]


Tokenizer = ByteTokenizer | HFTokenizer


def tokenizer_file(spec: Spec, spec_dir: Path | None = None) -> Path | None:
    """The file `model.tokenizer` names: absolute as is, relative from the spec file's folder (`spec_dir` when
    given), else from the working directory."""
    if spec.model.tokenizer is None:
        return None
    path = Path(spec.model.tokenizer)
    folder = spec_dir if spec_dir is not None else spec_folder(spec)
    return path if path.is_absolute() or folder is None else folder / path


def tokenizer_text(spec: Spec, spec_dir: Path | None = None) -> str | None:
    """The tokenizer file's text, which a compiled plan carries as its own tokenizer.json; a SpecError at
    `model.tokenizer` when it cannot be read or is not a tokenizer."""
    path = tokenizer_file(spec, spec_dir)
    if path is None:
        return None
    try:
        text = path.read_text()
        HFTokenizer(path, spec.model.vocab_size)
    except (OSError, UnicodeDecodeError, TokenizerError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        hint = ("a relative path is read from the spec file's folder" if not Path(spec.model.tokenizer).is_absolute()
                else None)
        raise SpecError([Problem(locate(spec, FIELD), FIELD, f"cannot read tokenizer {path}: {why}", hint)]) from None
    return text


def chat_template_text(spec: Spec, spec_dir: Path | None = None) -> str | None:
    """The chat template beside the spec's tokenizer (lcc.data.chat_template.find), as a plan carries it
    (chat_template.json), or None; a SpecError at `model.tokenizer` for one that cannot be read or parsed."""
    from lcc.data.chat_template import ChatTemplate, ChatTemplateError, find

    path = tokenizer_file(spec, spec_dir)
    if path is None:
        return None
    try:
        found = find(path)
        if found is None:
            return None
        ChatTemplate(found, f"the chat template beside {path}")
    except ChatTemplateError as exc:
        raise SpecError([Problem(locate(spec, FIELD), FIELD, str(exc))]) from None
    return json.dumps(found, indent=1, sort_keys=True) + "\n"


def tokenizer_digest(spec: Spec, spec_dir: Path | None = None) -> str | None:
    text = tokenizer_text(spec, spec_dir)
    return hashlib.sha256(text.encode()).hexdigest() if text is not None else None


def load_tokenizer(spec: Spec, spec_dir: Path | None = None) -> Tokenizer:
    """The spec's tokenizer, from the file it names; bytes when it names none."""
    if spec.model.tokenizer is None:
        return ByteTokenizer(spec.model.vocab_size)
    path = tokenizer_file(spec, spec_dir)
    if not path.is_file():
        raise TokenizerError(f"model.tokenizer: {path} is missing")
    return HFTokenizer(path, spec.model.vocab_size)


def plan_tokenizer(plan_dir: Path) -> Tokenizer:
    """A compiled plan's tokenizer: its own copy of the spec's (tokenizer.json in the plan folder), or bytes."""
    model = json.loads((Path(plan_dir) / "spec.json").read_text())["model"]
    if model.get("tokenizer") is None:
        return ByteTokenizer(model["vocab_size"])
    path = Path(plan_dir) / PLAN_FILE
    if not path.is_file():
        raise TokenizerError(f"{path}: missing (the plan's spec names model.tokenizer {model['tokenizer']!r}); "
                             "compile the plan again")
    return HFTokenizer(path, model["vocab_size"])
