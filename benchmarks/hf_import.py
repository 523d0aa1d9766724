"""Hugging Face import and export of a 1-2 GB model: wall time and peak resident memory of each command, as a
user runs it (a fresh process, start-up included), against the model's size on disk.

The model is a Mixtral-shaped bfloat16 model with random weights, written locally (in a separate process)
as save_pretrained writes one: safetensors shards of one tensor per expert and their index.

Usage: python -m benchmarks.hf_import [--layers 8] [--keep DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LCC = [sys.executable, "-m", "lcc"]
CONFIG = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "vocab_size": 32000, "hidden_size": 1024,
          "num_attention_heads": 16, "num_key_value_heads": 4, "num_local_experts": 8, "num_experts_per_tok": 2,
          "intermediate_size": 2816, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "dtype": "bfloat16",
          "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "tie_word_embeddings": False}

MAKE = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
out, cfg = Path(sys.argv[1]), json.loads(sys.argv[2])
d, f, e, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"], cfg["vocab_size"]
hd = d // cfg["num_attention_heads"]
kv = cfg["num_key_value_heads"] * hd
g = torch.Generator().manual_seed(0)
def t(*shape):
    return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
shards, weight_map, total = [], {}, 0
def flush(tensors):
    global total
    name = f"model-{len(shards) + 1:05d}.safetensors"
    save_file(tensors, str(out / name), metadata={"format": "pt"})
    shards.append(name)
    for k, x in tensors.items():
        weight_map[k] = name
        total += x.numel() * 2
flush({"model.embed_tokens.weight": t(v, d), "lm_head.weight": t(v, d),
       "model.norm.weight": torch.ones(d, dtype=torch.bfloat16)})
for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}"
    layer = {f"{p}.self_attn.q_proj.weight": t(d, d), f"{p}.self_attn.k_proj.weight": t(kv, d),
             f"{p}.self_attn.v_proj.weight": t(kv, d), f"{p}.self_attn.o_proj.weight": t(d, d),
             f"{p}.input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
             f"{p}.post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
             f"{p}.block_sparse_moe.gate.weight": t(e, d)}
    for j in range(e):
        q = f"{p}.block_sparse_moe.experts.{j}"
        layer.update({f"{q}.w1.weight": t(f, d), f"{q}.w3.weight": t(f, d), f"{q}.w2.weight": t(d, f)})
    flush(layer)
index = {"metadata": {"total_size": total}, "weight_map": weight_map}
(out / "model.safetensors.index.json").write_text(json.dumps(index))
(out / "config.json").write_text(json.dumps(cfg))
"""


def run(args: list[str]) -> tuple[float, float]:
    """(seconds, peak resident MiB) of one command in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    output = proc.stdout.read()
    if status != 0:
        raise SystemExit(f"{' '.join(map(str, args))} failed:\n{output}")
    print(output.strip())
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--out")
    args = parser.parse_args()
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lcc-hf-bench-"))
    try:
        model = base / "mixtral-random"
        if not (model / "config.json").is_file():
            model.mkdir(parents=True, exist_ok=True)
            config = {**CONFIG, "num_hidden_layers": args.layers}
            subprocess.run([sys.executable, "-c", MAKE, str(model), json.dumps(config)], check=True)
        size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        print(f"model: {size / 2**30:.2f} GiB of bfloat16 safetensors in {len(list(model.glob('*.safetensors')))} "
              "shards")
        for p in (base / "spec.yaml", base / "ckpt", base / "exported"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        steps = {
            "import hf (config -> spec)": [*LCC, "import", "hf", model, "--out", base / "spec.yaml"],
            "checkpoint import-hf (weights -> lcc checkpoint)": [*LCC, "checkpoint", "import-hf", model, "--spec",
                                                                 base / "spec.yaml", "--out", base / "ckpt"],
            "checkpoint export-hf (lcc checkpoint -> safetensors)": [*LCC, "checkpoint", "export-hf", base / "ckpt",
                                                                     "--out", base / "exported"],
        }
        idle = run([sys.executable, "-c", "import torch, lcc.cli"])
        results = {}
        for name, command in steps.items():
            seconds, peak = run([str(a) for a in command])
            results[name] = {"seconds": round(seconds, 2), "peak_rss_mib": round(peak, 1),
                             "peak_rss_over_model_size": round(peak * 2**20 / size, 3)}
            print(f"{name}: {seconds:.1f} s, peak resident {peak:.0f} MiB ({peak * 2**20 / size:.2f}x the model)")
        ckpt = sum(p.stat().st_size for p in (base / "ckpt").iterdir())
        result = {"machine": machine(), "model_bytes": size, "model_gib": round(size / 2**30, 3),
                  "checkpoint_bytes": ckpt, "python_torch_lcc_import_rss_mib": round(idle[1], 1),
                  "layers": args.layers, "commands": results}
        write("hf_import", result, args.out)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
