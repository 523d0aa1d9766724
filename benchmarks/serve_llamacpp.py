"""Decode on CPU against llama.cpp on the same weights, side by side in one run.

The model: a Qwen3-MoE made with transformers (8 layers, d_model 512, 8 query and 4 key/value heads of 64,
16 experts of width 512, 2 per token, vocabulary 4096, random weights), saved with a byte-level BPE tokenizer
trained here (llama.cpp's converter needs a tokenizer). lcc imports the folder (`lcc import hf`, `lcc checkpoint
import-hf`) and serves it at world 1 with int4 experts (group 32, the rest bfloat16) and all in bfloat16;
llama.cpp converts the same folder to GGUF (`convert_hf_to_gguf.py --outtype bf16`) and quantises it: Q4_0 on
the experts only (as lcc quantises) and its default Q4_0 mix. The converter refuses a tokenizer whose
pre-tokenizer it does not know: it runs here with the pre-tokenizer named `qwen2` (the tokenizer's text
handling, not the model's speed, is what that name is about).

Decode tokens/s at batch 1 and 16, 32-token prompts, 64 greedy tokens, the same threads: lcc's engine in this
process, 63 steps / (time of 64 tokens - time of 1 token); llama.cpp's `llama-batched-bench` token generation
rate (S_TG) for the same prompt and generation lengths. The two are measured in turn, `--repeats` rounds per
row (this machine's speed drifts over minutes): the medians of each side, and the median of the rounds'
ratios. For each: the
bytes a decode step reads per token (every non-expert weight, and the experts a step reaches: 2 per layer at
batch 1, the expected distinct ones of 32 uniform draws of 16 at batch 16) and that rate against this
machine's read bandwidth (measured here: summing a 1 GiB tensor).

llama.cpp comes from the package index: the source package of llama-cpp-python vendors it. This script
downloads it (`pip download --no-binary`) into `--work` and builds `llama-batched-bench` and `llama-quantize`
there with cmake (`-DGGML_NATIVE=ON`; minutes, once), or takes a built tree with `--llama-cpp DIR`.
Needs the bench extra (transformers), cmake, a C++ compiler and, once, the package index. Never in CI.
With `--kernels native,torch` (the default) each row runs twice on lcc's side: lcc's native kernels (built for
the CPU's AVX-512 or AVX2, named in the row) and PyTorch's.
Usage: python -m benchmarks.serve_llamacpp [--work DIR] [--llama-cpp DIR] [--threads 2] [--repeats 3]
       [--kernels native,torch]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file: python benchmarks/x.py

from lcc.backends.cpu import native  # noqa: E402

from benchmarks.common import machine, write  # noqa: E402

CONFIG = dict(vocab_size=4096, hidden_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
              num_hidden_layers=8, num_experts=16, moe_intermediate_size=512, num_experts_per_tok=2,
              norm_topk_prob=True, intermediate_size=1024, max_position_embeddings=2048, rms_norm_eps=1e-6,
              tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[])
PROMPT, NEW, BATCHES = 32, 64, (1, 16)
INT4 = "quantization.experts={bits: 4, group_size: 32, symmetric: true}"  # as Q4_0: symmetric, 32 a scale
TARGETS = ("llama-batched-bench", "llama-quantize")


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{done.stderr[-3000:]}")
    return done


def llama_tree(work: Path, given: Path | None) -> Path:
    """A llama.cpp source tree with the two tools built in build/bin."""
    if given is not None:
        tree = given
    else:
        found = sorted(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        if not found:
            run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "llama-cpp-python",
                 "-d", work])
            with tarfile.open(next(work.glob("llama_cpp_python-*.tar.gz"))) as tar:
                tar.extractall(work, filter="data")
            found = sorted(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        tree = found[-1]
    if not all((tree / "build" / "bin" / t).is_file() for t in TARGETS):
        print(f"building llama.cpp in {tree}/build (minutes)", flush=True)
        run(["cmake", "-B", tree / "build", "-S", tree, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
             "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"])
        run(["cmake", "--build", tree / "build", "--target", *TARGETS, "-j"])
    return tree


def make_model(base: Path) -> tuple[Path, Path, Path]:
    """The transformers model and its tokenizer in base/hf, lcc's spec of it and its weights."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lcc.cli import app

    hf_dir, spec, ckpt = base / "hf", base / "spec.yaml", base / "ckpt"
    torch.manual_seed(0)
    model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**CONFIG))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.02)
    model.save_pretrained(hf_dir)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [p.read_text() for p in sorted((Path(__file__).resolve().parents[1] / "docs").glob("*.md"))]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=CONFIG["vocab_size"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tf.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=bpe.id_to_token(0)).save_pretrained(hf_dir)
    for args in (["import", "hf", hf_dir, "--out", spec],
                 ["checkpoint", "import-hf", hf_dir, "--spec", spec, "--out", ckpt]):
        try:
            app([str(a) for a in args], standalone_mode=False)
        except SystemExit as exc:
            if exc.code:
                raise
    return hf_dir, spec, ckpt


CONVERT = """
import sys
tree, hf, out = sys.argv[1:4]
sys.path[:0] = [tree, tree + "/gguf-py"]
try:  # where the model classes live moved between llama.cpp versions
    from conversion.base import TextModel
except ImportError:
    from convert_hf_to_gguf import TextModel
import convert_hf_to_gguf as convert
TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = ["convert_hf_to_gguf.py", hf, "--outtype", "bf16", "--outfile", out]
convert.main()
"""


def ggufs(tree: Path, hf_dir: Path, base: Path) -> dict[str, Path]:
    bf16 = base / "model-bf16.gguf"
    run([sys.executable, "-c", CONVERT, tree, hf_dir, bf16])
    quantize = tree / "build" / "bin" / "llama-quantize"
    experts_q4 = base / "model-q4_0-experts.gguf"  # Q4_0, every tensor but the experts kept in bfloat16
    keep = [a for t in ("attn_q", "attn_k", "attn_v", "attn_output") for a in ("--tensor-type", f"{t}=bf16")]
    run([quantize, "--token-embedding-type", "bf16", "--output-tensor-type", "bf16", *keep, bf16, experts_q4, "q4_0"])
    types = tensor_types(tree, experts_q4)
    want = {n: ("Q4_0" if "_exps" in n else "F32" if t == "F32" else "BF16") for n, t in types.items()}
    if types != want:
        sys.exit(f"llama-quantize did not quantise the experts alone: {sorted(set(types.items()) - set(want.items()))}")
    mix = base / "model-q4_0.gguf"
    run([quantize, bf16, mix, "q4_0"])
    return {"bf16": bf16, "q4_0 experts": experts_q4, "q4_0 mix": mix}


def tensor_types(tree: Path, path: Path) -> dict[str, str]:
    sys.path.insert(0, str(tree / "gguf-py"))
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def gguf_bytes(tree: Path, path: Path) -> tuple[int, int]:
    """(bytes of the non-expert tensors, bytes of one layer's one expert), from the file's tensor table."""
    sys.path.insert(0, str(tree / "gguf-py"))
    from gguf import GGUFReader

    dense = experts = 0
    for t in GGUFReader(path).tensors:
        if "_exps" in t.name:
            experts += int(t.n_bytes)
        elif not t.name.startswith("token_embd"):  # a decode step reads one row of the embedding
            dense += int(t.n_bytes)
    return dense, experts // (CONFIG["num_hidden_layers"] * CONFIG["num_experts"])


def llama_decode(tree: Path, gguf: Path, batch: int, threads: int) -> float:
    """llama-batched-bench's token generation rate (tokens/s over all sequences)."""
    done = run([tree / "build" / "bin" / "llama-batched-bench", "-m", gguf, "-c", 4096, "-b", 2048, "-ub", 512,
                "-npp", PROMPT, "-ntg", NEW, "-npl", batch, "-t", threads, "--output-format", "jsonl"])
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return float(rows[-1]["speed_tg"])


def lcc_session(spec: Path, ckpt: Path, overrides: list[str], batch: int) -> tuple[object, object]:
    """lcc's serving rank for the spec, and a function that generates n tokens for each of `batch` prompts and
    returns the wall time."""
    from lcc.cache import write_atomically
    from lcc.compiler.plan import compile_plan
    from lcc.serve.engine import Engine
    from lcc.serve.rank import ServeRank
    from lcc.serve.sampling import SamplingParams
    from lcc.spec import load_spec

    plan_dir = Path(tempfile.mkdtemp()) / "plan"
    write_atomically(compile_plan(load_spec(spec, [*overrides, "serve.max_batch=16"]), "serve"), plan_dir)
    rank = ServeRank(plan_dir, 0, checkpoint_dir=ckpt)
    prompts = [[(7 * i + j) % 4000 + 10 for j in range(PROMPT)] for i in range(batch)]

    def generate(n: int) -> float:
        engine = Engine(rank, max_batched_tokens=PROMPT * batch)
        for p in prompts:
            engine.submit(p, SamplingParams(max_tokens=n))
        start = time.perf_counter()
        assert sum(len(u.token_ids) for u in engine.run()) == n * batch
        return time.perf_counter() - start

    return rank, generate


def side_by_side(tree: Path, gguf: Path, spec: Path, ckpt: Path, overrides: list[str], batch: int, threads: int,
                 repeats: int) -> tuple[float, float, float, object]:
    """lcc's and llama.cpp's decode tokens/s, measured in turn `repeats` times (this machine's speed drifts
    over minutes): the medians of each and of the rounds' ratios, and lcc's rank."""
    rank, generate = lcc_session(spec, ckpt, overrides, batch)
    generate(NEW)  # warm-up
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(batch * (NEW - 1) / (generate(NEW) - generate(1)))
        theirs.append(llama_decode(tree, gguf, batch, threads))
    ratio = statistics.median(o / t for o, t in zip(ours, theirs, strict=True))
    return statistics.median(ours), statistics.median(theirs), ratio, rank


def lcc_bytes(rank) -> tuple[int, int]:
    """(bytes of the non-expert weights but the embedding, bytes of one layer's one expert) as the rank holds them."""
    dense = experts = 0
    seen = set()
    for name, w in rank.params.items():
        if id(w) in seen:
            continue
        seen.add(id(w))
        n = w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes
        if "experts" in name:
            experts += n
        elif not name.startswith("embed"):
            dense += n
    return dense, experts // (CONFIG["num_hidden_layers"] * CONFIG["num_experts"])


def per_token(dense: int, expert: int, batch: int) -> float:
    E, K, L = CONFIG["num_experts"], CONFIG["num_experts_per_tok"], CONFIG["num_hidden_layers"]
    reached = E * (1 - (1 - 1 / E) ** (K * batch))  # expected distinct experts of K * batch uniform draws
    return (dense + L * reached * expert) / batch


def bandwidth() -> float:
    t = torch.ones(1 << 28)  # 1 GiB of float32
    t.sum()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        t.sum()
        times.append(time.perf_counter() - start)
    return t.numel() * 4 / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lcc-llamacpp")
    parser.add_argument("--llama-cpp", type=Path, help="a llama.cpp tree with build/bin/llama-batched-bench")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kernels", default="native,torch",
                        help="lcc's CPU kernels, one row each: native (lcc's own, built for this CPU's AVX-512 or "
                             "AVX2) and/or torch (PyTorch's)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if shutil.which("cmake") is None and args.llama_cpp is None:
        sys.exit("benchmarks.serve_llamacpp builds llama.cpp with cmake, which is not installed")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    tree = llama_tree(args.work, args.llama_cpp)
    kernels = args.kernels.split(",")
    if "native" in kernels and native.unavailable() is not None:
        sys.exit(f"--kernels native: lcc's native CPU kernels cannot run here: {native.unavailable()}")
    read = bandwidth()
    isa = native.load().isa if "native" in kernels else None
    result: dict = {"machine": machine(), "model": CONFIG, "read_bandwidth_gb_s": read / 1e9, "native_isa": isa,
                    "rows": []}
    print(f"read bandwidth: {read / 1e9:.1f} GB/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="lcc-llamacpp-") as tmp:
        base = Path(tmp)
        hf_dir, spec, ckpt = make_model(base)
        files = ggufs(tree, hf_dir, base)
        sides = [("int4 experts (group 32), rest bf16", [INT4], "q4_0 experts"),
                 ("bf16", ["quantization.experts=null"], "bf16"),
                 ("int4 experts (group 32), rest bf16", [INT4], "q4_0 mix")]
        for (label, overrides, gguf), kernel in itertools.product(sides, kernels):
            g_dense, g_expert = gguf_bytes(tree, files[gguf])
            for batch in BATCHES:
                ours, theirs, ratio, rank = side_by_side(tree, files[gguf], spec, ckpt,
                                                         ["serve.dtype=bfloat16", f"serve.cpu_kernels={kernel}",
                                                          *overrides], batch, args.threads, args.repeats)
                mine_b, their_b = per_token(*lcc_bytes(rank), batch), per_token(g_dense, g_expert, batch)
                kernel_name = f"native ({isa})" if kernel == "native" else kernel
                row = {"lcc": label, "lcc_kernels": kernel_name, "llama_cpp": gguf, "batch": batch,
                       "lcc_tokens_per_s": ours,
                       "llama_cpp_tokens_per_s": theirs, "ratio": ratio, "lcc_bytes_per_token": mine_b,
                       "llama_cpp_bytes_per_token": their_b, "lcc_bandwidth_fraction": ours * mine_b / read,
                       "llama_cpp_bandwidth_fraction": theirs * their_b / read}
                result["rows"].append(row)
                print(f"{label:36} [{kernel_name}] / {gguf:13} batch {batch:2}: lcc {ours:7.1f} tokens/s "
                      f"({mine_b / 1e6:.1f} MB/token, {row['lcc_bandwidth_fraction']:.0%} of bandwidth), "
                      f"llama.cpp {theirs:7.1f} "
                      f"({their_b / 1e6:.1f} MB/token, {row['llama_cpp_bandwidth_fraction']:.0%}): "
                      f"{ratio:.2f}x (median of the rounds' ratios)", flush=True)
    write("serve_llamacpp", result, args.out)


if __name__ == "__main__":
    main()
