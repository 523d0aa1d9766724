"""`lcc data prepare` throughput with 1 and 2 processes, and training's peak memory on a small against a large
prepared dataset.

Throughput: a JSON Lines file of --mib MiB of English-like documents (the built-in corpus's sentences, 2-4 KB a
document) written in a temporary folder, tokenized with a byte-level BPE tokenizer.json of --vocab tokens
(trained here with `tokenizers` on the built-in corpus) by 1 and by 2 worker processes, each --repeats times
alternating; tokens/s of the median run. Memory: tiny-moe at world 1
trained --steps steps on a prepared dataset of --small-mib MiB and of --large-mib MiB (the large one made by
writing the small one's tokens over and over: preparing it would take long and prove nothing more), each in
its own process; the peak resident memory of each (ru_maxrss), side by side.
Usage: python benchmarks/data_prepare.py [--mib 64] [--vocab 8192] [--repeats 3] [--small-mib 1] [--large-mib 2048]
       [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file: python benchmarks/x.py

from benchmarks.common import machine, write
from lcc.data.corpus import builtin_corpus
from lcc.data.prepare import ENDS, MANIFEST, TOKENS, Encoder, prepare, sha256

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["parallelism.pp=1", "parallelism.dp=1", "parallelism.tp=1", "parallelism.ep=1", "cluster.gpus_per_node=1",
         "parallelism.pipeline.microbatches=1", "train.seq_len=128", "train.global_batch=4"]
PEAK = """
import resource, sys
from lcc.runtime.launch import launch
launch(sys.argv[1], int(sys.argv[2]), quiet=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def documents_file(path: Path, mib: int) -> None:
    text = builtin_corpus().decode()
    with open(path, "w") as f:
        written, at = 0, 0
        while written < mib << 20:
            size = 2000 + (at * 7919) % 2000
            doc = text[at % (len(text) - 4000):][:size]
            line = json.dumps({"text": doc}) + "\n"
            f.write(line)
            written += len(line)
            at += size


def bpe_tokenizer(path: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    text = builtin_corpus().decode()
    tok.train_from_iterator([text[i:i + 4096] for i in range(0, len(text), 4096)],
                            trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))


def grown(small: Path, large: Path, mib: int) -> None:
    """A prepared dataset of about `mib` MiB: the small one's tokens repeated (its manifest made to match)."""
    large.mkdir()
    tokens = np.fromfile(small / TOKENS, dtype="<i4")
    ends = np.fromfile(small / ENDS, dtype="<i8")
    copies = max(1, (mib << 20) // tokens.nbytes)
    with open(large / TOKENS, "wb") as f:
        for _ in range(copies):
            tokens.tofile(f)
    np.concatenate([ends + i * len(tokens) for i in range(copies)]).astype("<i8").tofile(large / ENDS)
    manifest = json.loads((small / MANIFEST).read_text())
    files = {n: {"bytes": (large / n).stat().st_size, "sha256": sha256(large / n)} for n in (TOKENS, ENDS)}
    manifest.update(tokens=len(tokens) * copies, documents=len(ends) * copies, files=files)
    (large / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def peak_bytes(folder: Path, steps: int, work: Path) -> int:
    from lcc.compiler.output import write as write_plan
    from lcc.compiler.plan import compile_plan
    from lcc.spec import load_spec

    plan = work / f"plan-{folder.name}"
    spec = load_spec(ROOT / "specs" / "tiny-moe.yaml", [*TRAIN, "train.data.kind=prepared",
                                                        f"train.data.path={folder}"])
    write_plan(compile_plan(spec), plan)
    out = subprocess.run([sys.executable, "-c", PEAK, str(plan), str(steps)], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small-mib", type=int, default=1)
    parser.add_argument("--large-mib", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lcc-data-"))
    try:
        source = work / "docs.jsonl"
        documents_file(source, args.mib)
        bpe_tokenizer(work / "tokenizer.json", args.vocab)
        bpe = Encoder(args.vocab, str(work / "tokenizer.json"), 0, False, None)
        seconds: dict[int, list[float]] = {1: [], 2: []}
        tokens = 0
        for r in range(args.repeats):
            for workers in ((1, 2) if r % 2 == 0 else (2, 1)):
                out = work / f"out-{workers}"
                shutil.rmtree(out, ignore_errors=True)
                start = time.perf_counter()
                tokens = prepare([source], bpe, None, out, workers=workers)["tokens"]
                seconds[workers].append(time.perf_counter() - start)
        rates = {w: tokens / statistics.median(s) for w, s in seconds.items()}
        print(f"prepare {args.mib} MiB: {rates[1]:,.0f} tokens/s with 1 process, {rates[2]:,.0f} with 2 "
              f"({rates[2] / rates[1]:.2f}x)", flush=True)
        small = work / "small"
        documents_file(work / "small.jsonl", args.small_mib)
        prepare([work / "small.jsonl"], Encoder(256, None, None, False, None), None, small)
        large = work / "large"
        grown(small, large, args.large_mib)
        peaks = {"small": peak_bytes(small, args.steps, work), "large": peak_bytes(large, args.steps, work)}
        sizes = {k: (work / k / TOKENS).stat().st_size for k in ("small", "large")}
        print(f"training peak RSS: {peaks['small'] / 2**20:.0f} MiB on {sizes['small'] / 2**20:.0f} MiB of tokens, "
              f"{peaks['large'] / 2**20:.0f} MiB on {sizes['large'] / 2**20:.0f} MiB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write("data_prepare", {"source_mib": args.mib, "vocab": args.vocab, "tokens": tokens, "tokens_per_s": rates,
                           "seconds": seconds, "token_file_bytes": sizes, "training_peak_rss_bytes": peaks,
                           "steps": args.steps, "machine": machine()}, args.out)


if __name__ == "__main__":
    main()
