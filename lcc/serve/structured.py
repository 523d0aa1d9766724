"""Structured output: generation held to a JSON schema, any JSON object, a regular expression or a Lark grammar,
through llguidance (chosen by measurement: benchmarks/grammar_libraries.py, docs/benchmarks.md).

A request's grammar is compiled and checked when the request arrives (`Grammars.compile`: a GrammarError
names what is wrong, and the server answers 400). The engine gives each such sequence a `Constraint`:
before its token is sampled, the tokens the grammar does not allow next are masked out of its logits on
rank 0 (`allowed`); the sampled token then advances the matcher (`advance`). Once the grammar can take
nothing more (`done`), the sequence ends with finish reason `stop`; the model's own end-of-sequence token
is allowed wherever the grammar could end.

The vocabulary: a model's tokenizer.json as llguidance reads it, with its first stop token as the end of
sequence; where llguidance cannot read the file (a decoder it does not know) or the model has no stop
token, each token's bytes are taken from the tokenizer itself. A byte-level model's tokens are its bytes
(ids past 255 never allowed). Where there is no end-of-sequence token in the vocabulary, one more id
stands for it, past the logits: such a sequence ends when its grammar is done.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import torch

from lcc.data.tokenizer import ByteTokenizer, Tokenizer

JSON_OBJECT = {"type": "object"}
KINDS = ("json_schema", "json_object", "regex", "grammar")
MAX_GRAMMAR_CHARS = 1 << 20  # a schema, expression or grammar longer than this is refused
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback tokens
_SHIFTS = torch.arange(32, dtype=torch.int32)


class GrammarError(ValueError):
    """A schema or grammar that cannot be compiled; its message says what is wrong."""


class _Tokens:
    """What llguidance's TokenizerWrapper reads: each token's bytes, the end of sequence, the special ids, and
    encoding."""

    def __init__(self, tokens: list[bytes], eos: int, special: list[int], encode: Any):
        self.tokens, self.eos_token_id, self.bos_token_id = tokens, eos, None
        self.special_token_ids, self._encode = special, encode

    def __call__(self, text: bytes) -> list[int]:
        return self._encode(text)


def _greedy(tokens: list[bytes], special: set[int]) -> Any:
    """Bytes to token ids, the longest token first (what llguidance asks of a tokenizer: ids that spell the
    bytes; the tokenizer's own encoding may add a prefix, as SentencePiece's adds a space)."""
    by_bytes: dict[bytes, int] = {}
    for i, b in enumerate(tokens):
        if b and i not in special:
            by_bytes.setdefault(b, i)
    longest = max(map(len, by_bytes), default=1)

    def encode(text: bytes) -> list[int]:
        out, at = [], 0
        while at < len(text):
            for size in range(min(longest, len(text) - at), 0, -1):
                if (i := by_bytes.get(text[at:at + size])) is not None:
                    out.append(i)
                    at += size
                    break
            else:
                at += 1  # a byte no token spells
        return out

    return encode


class Grammars:
    """The served model's vocabulary as llguidance sees it (built at the first structured request), and the
    grammars of requests."""

    def __init__(self, tokenizer: Tokenizer, stop_tokens: list[int], vocab_size: int):
        self.tokenizer, self.stops, self.vocab = tokenizer, list(stop_tokens), vocab_size
        self._llg: Any = None
        self._lock = threading.Lock()

    def llg_tokenizer(self) -> Any:
        with self._lock:
            if self._llg is None:
                self._llg = self._build()
            return self._llg

    def _build(self) -> Any:
        import llguidance as llg

        t = self.tokenizer
        if isinstance(t, ByteTokenizer):
            size = max(self.vocab, 257)  # id 256 (a spare id, or one past the logits) is the end of sequence
            tokens = [bytes([i]) for i in range(256)] + [b""] * (size - 256)
            return llg.LLTokenizer(llg.TokenizerWrapper(_Tokens(tokens, 256, list(range(256, size)), list)),
                                   n_vocab=size)
        if self.stops:
            try:
                return llg.LLTokenizer(t.path.read_text(), n_vocab=self.vocab, eos_token=self.stops[0])
            except ValueError:  # a tokenizer.json llguidance does not read: each token's bytes, below
                pass
        return llg.LLTokenizer(llg.TokenizerWrapper(self._token_bytes()), n_vocab=self.vocab + (not self.stops))

    def _token_bytes(self) -> _Tokens:
        """Each token's bytes from the tokenizer itself: the text a token adds after a reference token (which
        keeps a leading space a decoder would drop at the start), or the byte a fallback token stands for."""
        hf = self.tokenizer._tok
        n = hf.get_vocab_size()
        special = {i for i, added in hf.get_added_tokens_decoder().items() if added.special}
        ref = next(i for i in range(n) if i not in special)
        base = hf.decode([ref], skip_special_tokens=False)
        tokens = []
        for i in range(self.vocab):
            piece = hf.id_to_token(i) if i < n else None
            if piece is None or i in special:
                tokens.append(b"")
            elif m := _BYTE_TOKEN.fullmatch(piece):
                tokens.append(bytes([int(m[1], 16)]))
            else:
                tokens.append(hf.decode([ref, i], skip_special_tokens=False)[len(base):].encode())
        eos = self.stops[0] if self.stops else self.vocab
        if not self.stops:
            tokens.append(b"")
        ids = sorted({*special, *range(n, len(tokens)), eos})
        return _Tokens(tokens, eos, ids, _greedy(tokens, set(ids)))

    def compile(self, kind: str, value: Any) -> str:
        """The llguidance grammar of a request's `kind` (KINDS) and value (a schema, an expression, a Lark
        grammar); GrammarError naming what is wrong."""
        import llguidance as llg

        if kind not in KINDS:
            raise GrammarError(f"unknown kind {kind!r}: one of {', '.join(KINDS)}")
        if kind in ("regex", "grammar") and not isinstance(value, str):
            raise GrammarError(f"a {kind} is a string, not {type(value).__name__}")
        if kind == "json_schema" and not isinstance(value, dict):
            raise GrammarError(f"a JSON schema is an object, not {type(value).__name__}")
        size = len(value) if isinstance(value, str) else len(json.dumps(value))
        if size > MAX_GRAMMAR_CHARS:
            raise GrammarError(f"it has {size} characters; at most {MAX_GRAMMAR_CHARS} are taken")
        try:
            if kind in ("json_schema", "json_object"):
                grammar = llg.LLMatcher.grammar_from_json_schema(value if kind == "json_schema" else JSON_OBJECT,
                                                                 overrides={"whitespace_flexible": False})
            elif kind == "regex":
                grammar = llg.LLMatcher.grammar_from_regex(value)
            else:
                grammar = llg.LLMatcher.grammar_from_lark(value)
            failed, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.llg_tokenizer())
        except (ValueError, TypeError, RuntimeError) as exc:
            raise GrammarError(str(exc)) from None
        if failed:
            raise GrammarError("; ".join(m.strip() for m in messages) or "the grammar does not compile")
        return grammar

    def constraint(self, grammar: str) -> Constraint:
        return Constraint(self.llg_tokenizer(), grammar, self.vocab)


class Constraint:
    """One sequence's grammar: which tokens may come next, and whether it is done."""

    def __init__(self, tok: Any, grammar: str, vocab: int):
        import llguidance as llg

        self.matcher = llg.LLMatcher(tok, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())
        self.vocab = vocab
        self.words = torch.zeros((tok.vocab_size + 31) // 32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """bool [vocab]: the tokens the grammar allows next."""
        self.matcher.unsafe_compute_mask_ptr(self.words.data_ptr(), self.words.numel() * 4)
        bits = (self.words.unsqueeze(1) >> _SHIFTS) & 1
        return bits.view(-1)[:self.vocab].bool()

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} does not follow the grammar: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """Nothing more can follow (only the end of sequence)."""
        return self.matcher.is_stopped()
