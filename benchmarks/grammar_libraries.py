"""Structured output's cost per token with each grammar library: xgrammar, llguidance and outlines-core.

For the server's `response_format` (json_object / json_schema): each decode step computes the request's
allowed-token bitmask, applies it to rank 0's float32 logits (-inf where not allowed) and, once a token is
sampled, advances the grammar's matcher with it. This measures those steps for each of the three libraries that
this interpreter can import (an absent one is skipped with a message), on three vocabularies:

- byte: token i is byte i, vocab_size 260 (lcc's byte-level models: ids 256.. decode to nothing and must stay
  masked; no EOS: a generation ends when the grammar is complete);
- bpe4096 and bpe32000: byte-level BPE tokenizer.json files (ByteLevel pre-tokenizer and decoder, <|endoftext|>
  the EOS) trained with `tokenizers` on the standard library's .py files, cached under --cache; each library
  reads them without transformers.

Measured, per library and vocabulary:

- setup: the library's tokenizer object from the tokenizer.json text or the raw byte list (once per model);
- compile: the median of --compile-repeats compilations of json_object ({"type": "object"}) and of SCHEMA
  below (no cache), and the first mask of a fresh matcher (where a library builds lazily);
- per token: a valid document for SCHEMA walked token by token, --walks times, each walk with a new matcher:
  before each token the bitmask is computed (mask) and applied to the logits (apply: one torch op for all, as
  every library writes the same int32 bitmask layout, 32 ids a word, low bit first), then the matcher takes the
  token (advance). Median and p90 microseconds of mask+apply, of advance and of their sum, under both grammars;
- correctness: --samples seeded generations under SCHEMA from random logits (sampled from the masked logits, at
  most --max-tokens tokens, ending on EOS or when nothing but EOS is allowed); the text must parse as JSON and
  validate against SCHEMA (jsonschema), and the byte vocabulary's ids past 255 must never be allowed;
- probes, on the byte vocabulary: whether each library lets through what the schema or JSON forbids (strings
  past maxLength, integers past minimum/maximum, arrays past maxItems, raw control characters in strings, an
  array where json_object asks for an object) and refuses what they allow (escapes, nesting); and what each
  does with an invalid schema.

Whitespace is compact in all three (none between tokens; separators "," and ":").
Usage: python benchmarks/grammar_libraries.py [--vocabs byte,bpe4096,bpe32000] [--walks 20] [--samples 20]
       [--max-tokens 200] [--compile-repeats 3] [--threads 2] [--cache DIR] [--out PATH]
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import json
import re
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file: python benchmarks/x.py

from benchmarks.common import machine, write

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 16},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
                         "ok": {"type": "boolean"}},
          "required": ["name", "age", "tags", "ok"], "additionalProperties": False}
JSON_OBJECT = {"type": "object"}
GRAMMARS = {"json_object": JSON_OBJECT, "schema": SCHEMA}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry", "engines"], "ok": True}
INVALID = {"unknown_type": {"type": "object", "properties": {"a": {"type": "nope"}}}, "type_not_string": {"type": 5}}
PROBES = {  # (grammar, text, whether it is a valid prefix: what a correct matcher accepts), on the byte vocabulary
    "maxLength": ("schema", '{"name":"' + "a" * 17, False),
    "minimum": ("schema", '{"name":"a","age":-1', False),
    "maximum": ("schema", '{"name":"a","age":151', False),
    "maxItems": ("schema", '{"name":"a","age":1,"tags":["a","b","c","d"', False),
    "items.maxLength": ("schema", '{"name":"a","age":1,"tags":["aaaaaaaaa', False),
    "raw control char in bounded string": ("schema", '{"name":"a\x1e', False),  # JSON forbids U+0000-U+001F
    "escaped quote in bounded string": ("schema", '{"name":"a\\"b"', True),
    "\\u escape in bounded string": ("schema", '{"name":"a\\u00e9"', True),
    "raw control char in string": ("json_object", '{"a":"\x1e', False),
    "\\u escape in string": ("json_object", '{"a":"\\u00e9"}', True),
    "4 levels deep": ("json_object", '{"a":{"b":[1,{"c":null}]}}', True),
    "array at the top": ("json_object", "[1]", False),
}
BYTE_VOCAB = 260  # a byte-level model's vocab_size: larger than 256, the ids past 255 decode to nothing
EOS = "<|endoftext|>"


def compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


@dataclass
class Vocab:
    name: str
    size: int  # the logits' width
    tokens: list[bytes]  # the bytes of each id below len(tokens); special tokens have their text
    eos: int | None
    tokenizer_json: str | None  # the tokenizer.json text, None for the byte vocabulary
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]


def byte_vocab(size: int = BYTE_VOCAB) -> Vocab:
    return Vocab("byte", size, [bytes([i]) for i in range(256)], None, None, lambda s: list(s.encode("utf-8")),
                 lambda ids: bytes(i for i in ids if i < 256).decode("utf-8", errors="replace"))


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's map of bytes to printable characters, reversed: the character a byte-level BPE token spells a
    byte with, to that byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def stdlib_texts() -> list[str]:
    texts = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            texts.append(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def bpe_vocab(size: int, cache: Path) -> Vocab:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = cache / f"bpe{size}.json"
    if not path.exists():
        start = time.perf_counter()
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=[EOS], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(stdlib_texts(), trainer)
        cache.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
        print(f"trained {path} in {time.perf_counter() - start:.1f} s")
    text = path.read_text()
    tok = Tokenizer.from_str(text)
    alphabet = byte_level_alphabet()
    special = {i: t.content for i, t in tok.get_added_tokens_decoder().items()}
    n = tok.get_vocab_size()
    tokens = [special[i].encode() if i in special else bytes(alphabet[c] for c in tok.id_to_token(i))
              for i in range(n)]
    return Vocab(f"bpe{size}", n, tokens, tok.token_to_id(EOS), text, lambda s: tok.encode(s).ids,
                 lambda ids: tok.decode(ids, skip_special_tokens=True))


class Backend:
    """One library behind the calls a decode step makes. `setup` returns the per-model context and the id the
    library treats as the stop token (None: the mask is empty once the grammar is complete)."""

    name = ""
    module = ""
    package = ""

    def setup(self, v: Vocab, threads: int) -> tuple[object, int | None]:
        raise NotImplementedError

    def compile(self, ctx: object, schema: dict) -> object:
        raise NotImplementedError

    def matcher(self, ctx: object, grammar: object) -> object:
        raise NotImplementedError

    def fill(self, m: object, bitmask: torch.Tensor) -> None:
        raise NotImplementedError

    def advance(self, m: object, token: int) -> bool:
        raise NotImplementedError

    def accepting(self, m: object) -> bool:
        raise NotImplementedError

    def invalid(self, ctx: object, schema: dict) -> str:
        """What the library does with an invalid schema, in words."""
        try:
            self.compile(ctx, schema)
        except Exception as exc:  # noqa: BLE001 - reporting whatever each library raises
            return f"{type(exc).__name__}: {clean(str(exc))}"
        return "accepted (no error)"


def clean(message: str) -> str:
    """An error message without the C++ log prefix (`[12:00:00] /project/cpp/x.cc:12: `) and trailing space."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", message.strip()).splitlines()[0][:200]


class XGrammar(Backend):
    name, module, package = "xgrammar", "xgrammar", "xgrammar"

    def setup(self, v: Vocab, threads: int) -> tuple[object, int | None]:
        import xgrammar as xgr

        if v.tokenizer_json is None:  # raw bytes; ids past the list are padding, never allowed
            info = xgr.TokenizerInfo(v.tokens, xgr.VocabType.RAW, vocab_size=v.size, stop_token_ids=None)
        else:  # without transformers: the vocabulary as the tokenizer.json spells it, its type detected from it
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(v.tokenizer_json)
            encoded = [tok.id_to_token(i) or "" for i in range(tok.get_vocab_size())]
            meta = xgr.TokenizerInfo._detect_metadata_from_hf(v.tokenizer_json)
            info = xgr.TokenizerInfo(encoded, meta["vocab_type"], vocab_size=v.size, stop_token_ids=[v.eos],
                                     add_prefix_space=meta["add_prefix_space"])
        return xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False), v.eos

    def compile(self, ctx: object, schema: dict) -> object:
        return ctx.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))

    def matcher(self, ctx: object, grammar: object) -> object:
        import xgrammar as xgr

        no_stop = not grammar.tokenizer_info.stop_token_ids
        return xgr.GrammarMatcher(grammar, terminate_without_stop_token=no_stop)

    def fill(self, m: object, bitmask: torch.Tensor) -> None:
        m.fill_next_token_bitmask(bitmask)

    def advance(self, m: object, token: int) -> bool:
        return m.accept_token(token)

    def accepting(self, m: object) -> bool:
        return m.is_completed()


class _ByteTokenizer:
    """What llguidance's TokenizerWrapper reads: the tokens' bytes, the EOS, the special ids, and encoding."""

    def __init__(self, size: int, stop: int):
        self.tokens = [bytes([i]) for i in range(256)] + [b""] * (size - 256)
        self.eos_token_id, self.bos_token_id = stop, None
        self.special_token_ids = list(range(256, size))

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


class LLGuidance(Backend):
    name, module, package = "llguidance", "llguidance", "llguidance"

    def setup(self, v: Vocab, threads: int) -> tuple[object, int | None]:
        import llguidance as llg

        if v.tokenizer_json is None:  # an EOS is required: id 256, a spare id, stands for "stop"
            tok = llg.LLTokenizer(llg.TokenizerWrapper(_ByteTokenizer(v.size, 256)), n_vocab=v.size)
        else:
            tok = llg.LLTokenizer(v.tokenizer_json, n_vocab=v.size, eos_token=v.eos)
        return tok, tok.eos_token

    def compile(self, ctx: object, schema: dict) -> object:
        import llguidance as llg

        grammar = llg.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False})
        m = llg.LLMatcher(ctx, grammar, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def matcher(self, ctx: object, grammar: object) -> object:
        return grammar.deep_copy()

    def fill(self, m: object, bitmask: torch.Tensor) -> None:
        m.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * bitmask.element_size())

    def advance(self, m: object, token: int) -> bool:
        return m.consume_token(token)

    def accepting(self, m: object) -> bool:
        return m.is_accepting()

    def invalid(self, ctx: object, schema: dict) -> str:
        import llguidance as llg

        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False})
            m = llg.LLMatcher(ctx, grammar, log_level=0)
        except Exception as exc:  # noqa: BLE001 - reporting whatever the library raises
            return f"{type(exc).__name__}: {clean(str(exc))}"
        if m.is_error():
            return f"no exception; LLMatcher.is_error() is True, get_error(): {m.get_error()!r}"
        return "accepted (no error)"


class OutlinesCore(Backend):
    name, module, package = "outlines-core", "outlines_core", "outlines-core"

    def setup(self, v: Vocab, threads: int) -> tuple[object, int | None]:
        from outlines_core import Vocabulary

        stop = v.eos if v.eos is not None else 256  # an EOS is required: id 256, a spare id, stands for "stop"
        ids: dict[bytes, list[int]] = {}
        for i, b in enumerate(v.tokens):
            if i != stop and b:
                ids.setdefault(b, []).append(i)
        return Vocabulary(stop, ids), stop

    def compile(self, ctx: object, schema: dict) -> object:
        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema

        return Index(build_regex_from_schema(json.dumps(schema), whitespace_pattern=""), ctx)

    def matcher(self, ctx: object, grammar: object) -> object:
        from outlines_core import Guide

        return Guide(grammar)

    def fill(self, m: object, bitmask: torch.Tensor) -> None:
        m.write_mask_into(bitmask.data_ptr(), bitmask.numel(), bitmask.element_size())

    def advance(self, m: object, token: int) -> bool:
        m.advance(token, return_tokens=False)
        return True

    def accepting(self, m: object) -> bool:
        return m.is_finished()


BACKENDS = [XGrammar(), LLGuidance(), OutlinesCore()]
SHIFTS = torch.arange(32, dtype=torch.int32)


def allowed(bitmask: torch.Tensor, size: int) -> torch.Tensor:
    return ((bitmask.view(-1, 1) >> SHIFTS) & 1).view(-1)[:size].bool()


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    logits.masked_fill_(~allowed(bitmask, logits.numel()), float("-inf"))


def new_bitmask(size: int) -> torch.Tensor:
    return torch.full(((size + 31) // 32,), -1, dtype=torch.int32)


def quantiles(ns: list[int]) -> dict[str, float]:
    us = [n / 1000 for n in ns]
    return {"median_us": statistics.median(us), "p90_us": statistics.quantiles(us, n=10)[8], "n": len(us)}


def median_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """The median time of `fn` and its last result; a call over 5 s is not repeated."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        if times[-1] > 5:
            break
    return statistics.median(times), result


def walk(b: Backend, ctx: object, grammar: object, ids: list[int], size: int, walks: int) -> dict[str, object]:
    """The document's tokens through a fresh matcher, --walks times: mask, apply and advance timed apart."""
    bitmask, base = new_bitmask(size), torch.randn(size, generator=torch.Generator().manual_seed(0))
    mask_ns, apply_ns, advance_ns, step_ns, total_ns = [], [], [], [], []
    complete = True
    gc.disable()
    try:
        for _ in range(walks):
            m = b.matcher(ctx, grammar)
            for t in ids:
                logits = base.clone()
                t0 = time.perf_counter_ns()
                b.fill(m, bitmask)
                t1 = time.perf_counter_ns()
                apply_bitmask(logits, bitmask)
                t2 = time.perf_counter_ns()
                ok = b.advance(m, t)
                t3 = time.perf_counter_ns()
                if not ok or logits[t].item() == float("-inf"):
                    raise RuntimeError(f"{b.name}: the document's token {t} was not allowed")
                mask_ns.append(t1 - t0)
                apply_ns.append(t2 - t1)
                advance_ns.append(t3 - t2)
                step_ns.append(t2 - t0)
                total_ns.append(t3 - t0)
            complete = complete and b.accepting(m)
    finally:
        gc.enable()
    return {"tokens": len(ids), "mask": quantiles(mask_ns), "apply": quantiles(apply_ns),
            "mask_apply": quantiles(step_ns), "advance": quantiles(advance_ns), "total": quantiles(total_ns),
            "accepting_at_end": complete}


def generate(b: Backend, ctx: object, grammar: object, v: Vocab, stop: int | None, seed: int,
             max_tokens: int) -> dict[str, object]:
    """One generation from seeded random logits through the mask; what it wrote and whether it validates."""
    import jsonschema

    gen = torch.Generator().manual_seed(seed)
    m, bitmask, ids = b.matcher(ctx, grammar), new_bitmask(v.size), []
    finished, error, spare = False, None, 0
    real = len(v.tokens) if v.tokenizer_json is None else v.size  # ids at or past it: spare (the byte vocab's)
    for _ in range(max_tokens):
        bitmask.zero_()
        b.fill(m, bitmask)
        ok = allowed(bitmask, v.size)
        spare += int(ok[real:].sum()) - int(stop is not None and stop >= real and bool(ok[stop]))
        count = int(ok.sum())
        if count == 0 or (stop is not None and count == 1 and bool(ok[stop])):
            finished = b.accepting(m)
            break
        logits = torch.randn(v.size, generator=gen)
        apply_bitmask(logits, bitmask)
        token = int(torch.multinomial(torch.softmax(logits, 0), 1, generator=gen))
        if token == stop:
            finished = True
            break
        if not b.advance(m, token):
            error = f"token {token} refused"
            break
        ids.append(token)
    text = v.decode(ids)
    valid = lenient = False
    if finished:
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
            valid = True
        except (ValueError, jsonschema.ValidationError) as exc:
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        try:  # raw control characters in strings let through
            jsonschema.validate(json.loads(text, strict=False), SCHEMA)
            lenient = True
        except (ValueError, jsonschema.ValidationError):
            pass
    return {"text": text, "tokens": len(ids), "finished": finished, "valid": valid, "error": error,
            "valid_with_raw_control_chars": lenient, "spare_ids_allowed": spare}


def accepts(b: Backend, ctx: object, grammar: object, v: Vocab, text: str) -> bool:
    """Whether every token of the text is allowed in turn."""
    m, bitmask = b.matcher(ctx, grammar), new_bitmask(v.size)
    for t in v.encode(text):
        bitmask.zero_()
        b.fill(m, bitmask)
        if not allowed(bitmask, v.size)[t] or not b.advance(m, t):
            return False
    return True


def measure(b: Backend, v: Vocab, args: argparse.Namespace) -> dict[str, object]:
    start = time.perf_counter()
    ctx, stop = b.setup(v, args.threads)
    out: dict[str, object] = {"setup_ms": (time.perf_counter() - start) * 1e3, "stop_id": stop}
    ids = v.encode(compact(DOCUMENT))
    for kind, schema in GRAMMARS.items():
        seconds, grammar = median_seconds(lambda schema=schema: b.compile(ctx, schema), args.compile_repeats)
        start = time.perf_counter()
        m = b.matcher(ctx, grammar)
        matcher_s = time.perf_counter() - start
        bitmask = new_bitmask(v.size)
        start = time.perf_counter()
        b.fill(m, bitmask)
        first_s = time.perf_counter() - start
        out[kind] = {"compile_ms": seconds * 1e3, "matcher_ms": matcher_s * 1e3, "first_mask_ms": first_s * 1e3,
                     "walk": walk(b, ctx, grammar, ids, v.size, args.walks)}
        if kind == "schema":
            runs = [generate(b, ctx, grammar, v, stop, seed, args.max_tokens) for seed in range(args.samples)]
            out[kind]["samples"] = {"n": len(runs), "finished": sum(r["finished"] for r in runs),
                                    "valid": sum(r["valid"] for r in runs),
                                    "valid_with_raw_control_chars": sum(r["valid_with_raw_control_chars"]
                                                                        for r in runs),
                                    "spare_ids_allowed": sum(r["spare_ids_allowed"] for r in runs),
                                    "failures": [r for r in runs if not r["valid"]][:5],
                                    "examples": [r["text"] for r in runs[:3]]}
        if v.tokenizer_json is None:
            out[kind]["probes"] = {name: {"accepted": accepts(b, ctx, grammar, v, text), "valid": valid}
                                   for name, (k, text, valid) in PROBES.items() if k == kind}
    if v.tokenizer_json is None:
        out["invalid_schemas"] = {name: b.invalid(ctx, schema) for name, schema in INVALID.items()}
    return out


def apply_cost(size: int, repeats: int = 300) -> dict[str, float]:
    """Median µs to apply one bitmask (half the ids allowed) to a copy of float32 logits: the torch op the walks
    use, numpy's unpackbits, and xgrammar's own CPU kernel (where importable); `clone` is the copy alone."""
    bitmask = torch.randint(-(2**31), 2**31 - 1, ((size + 31) // 32,), dtype=torch.int32,
                            generator=torch.Generator().manual_seed(0))
    logits = torch.randn(size)
    cases: dict[str, Callable[[], object]] = {"clone": logits.clone,
                                              "torch": lambda: apply_bitmask(logits.clone(), bitmask)}
    try:
        import numpy as np

        def numpy_apply() -> None:
            bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little", count=size)
            logits.clone().numpy()[bits == 0] = -np.inf

        cases["numpy"] = numpy_apply
    except ImportError:
        pass
    try:
        import xgrammar as xgr

        cases["xgrammar_cpu"] = lambda: xgr.apply_token_bitmask_inplace(logits.clone()[None], bitmask[None],
                                                                      vocab_size=size)
    except ImportError:
        pass
    row = {}
    for name, fn in cases.items():
        ns = []
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            fn()
            ns.append(time.perf_counter_ns() - t0)
        row[name] = statistics.median(ns) / 1000
    return row


def cpu_model() -> str:
    """/proc/cpuinfo's model name, family and model."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    info = {}
    for line in lines:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return f"{info.get('model name', 'unknown')} (family {info.get('cpu family')}, model {info.get('model')})"


def library_versions() -> dict[str, str | None]:
    out = {}
    for name in ["xgrammar", "llguidance", "outlines-core", "tokenizers", "jsonschema", "transformers", "triton"]:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def table(results: dict[str, dict[str, dict]]) -> str:
    def q(x: dict[str, float]) -> str:
        return f"{x['median_us']:.1f}/{x['p90_us']:.1f}"

    head = (f"{'library':13} {'vocab':8} {'grammar':11} {'setup':>6} {'compile':>8} {'1st mask':>8} {'mask':>12} "
            f"{'mask+apply':>12} {'advance':>10} {'total':>12} {'valid':>9}")
    lines = ["setup, compile, 1st mask: ms; mask, mask+apply, advance, total: µs per token, median/p90; "
             "valid: validated/generations (finished)", head, "-" * len(head)]
    for lib, per_vocab in results.items():
        for vocab, r in per_vocab.items():
            if "skipped" in r:
                lines.append(f"{lib:13} {vocab:8} {r['skipped']}")
                continue
            for kind in GRAMMARS:
                g, w = r[kind], r[kind]["walk"]
                s = g.get("samples")
                valid = f"{s['valid']}/{s['n']} ({s['finished']})" if s else "-"
                lines.append(f"{lib:13} {vocab:8} {kind:11} {r['setup_ms']:6.1f} {g['compile_ms']:8.1f} "
                             f"{g['first_mask_ms']:8.3f} {q(w['mask']):>12} {q(w['mask_apply']):>12} "
                             f"{q(w['advance']):>10} {q(w['total']):>12} {valid:>9}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabs", default="byte,bpe4096,bpe32000")
    parser.add_argument("--walks", type=int, default=20)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--compile-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "lcc-grammar-bench"))
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    present = []
    for b in BACKENDS:
        start = time.perf_counter()
        try:
            importlib.import_module(b.module)
        except ImportError as exc:
            print(f"skipping {b.name}: not importable here ({exc})")
            continue
        present.append((b, (time.perf_counter() - start) * 1e3))
    vocabs = []
    for name in args.vocabs.split(","):
        vocabs.append(byte_vocab() if name == "byte" else bpe_vocab(int(name.removeprefix("bpe")), Path(args.cache)))

    results: dict[str, dict[str, dict]] = {}
    for b, _ in present:
        results[b.name] = {}
        for v in vocabs:
            print(f"{b.name} on {v.name} ({v.size} ids) ...", flush=True)
            try:
                results[b.name][v.name] = measure(b, v, args)
            except Exception as exc:  # noqa: BLE001 - one library failing on one vocabulary is a result
                results[b.name][v.name] = {"skipped": f"failed: {type(exc).__name__}: {clean(str(exc))}"}
    print(table(results))
    for lib, per_vocab in results.items():
        for vocab, r in per_vocab.items():
            if "invalid_schemas" in r:
                probes = {name: p for kind in GRAMMARS for name, p in r[kind]["probes"].items()}
                through = [name for name, p in probes.items() if p["accepted"] and not p["valid"]]
                refused = [name for name, p in probes.items() if not p["accepted"] and p["valid"]]
                print(f"{lib} {vocab}: lets through: {', '.join(through) or 'nothing invalid'}; "
                      f"refuses valid: {', '.join(refused) or 'nothing'}")
                for name, what in r["invalid_schemas"].items():
                    print(f"  invalid schema {name}: {what}")

    result = {"machine": {**machine(), "cpu_model": cpu_model()}, "versions": library_versions(),
              "import_ms": {b.name: ms for b, ms in present},
              "skipped": [b.name for b in BACKENDS if b not in [p for p, _ in present]],
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "schema": SCHEMA, "document": compact(DOCUMENT),
              "document_tokens": {v.name: len(v.encode(compact(DOCUMENT))) for v in vocabs},
              "apply_us": {v.size: apply_cost(v.size) for v in vocabs}, "results": results}
    write("grammar_libraries", result, args.out)


if __name__ == "__main__":
    main()
