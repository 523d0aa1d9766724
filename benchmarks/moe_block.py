"""The MoE block on CPU against Hugging Face transformers' Qwen3-MoE sparse block (grouped_mm experts).

Shapes: d_model 512, 64 experts, expert d_ff 256, fixed top-4 (one group), 2048 tokens, float32,
2 threads. Both blocks run round-robin in one process; reported in tokens/s, as a ratio, and as a
fraction of this machine's float32 matmul rate measured in the same run.
Needs the bench extra: pip install -e ".[bench]".
Usage: python benchmarks/moe_block.py [--repeats 15] [--threads 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file: python benchmarks/x.py

from benchmarks.common import interleaved, machine, matmul_flops_per_second, timing_args, write
from lcc.model.moe import MoEBlock
from lcc.spec.models import MoE, Routing

T, D, E, F, K = 2048, 512, 64, 256, 4


def ours() -> torch.nn.Module:
    routing = Routing(groups={"top": 1, "temperature": 1.0}, experts={"selection": "top_score"},
                      k={"min": K, "max": K, "threshold": 1.0}, renormalize=True)
    block = MoEBlock(D, MoE(n_experts=E, n_groups=1, expert_d_ff=F), routing)
    _init(block)
    return block


def theirs() -> torch.nn.Module:
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=K,
                            norm_topk_prob=True)
    config._experts_implementation = "grouped_mm"
    block = Qwen3MoeSparseMoeBlock(config)
    _init(block)
    return block


def _init(block: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def main() -> None:
    args = timing_args(repeats=15)
    try:
        hf = theirs()
    except ImportError:
        sys.exit("transformers is not installed: pip install -e '.[bench]'")
    mine = ours()
    x = torch.randn(1, T, D, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(1, T, D, generator=torch.Generator().manual_seed(2))

    def fwd(block):
        def run():
            with torch.no_grad():
                block(x)
        return run

    def fwd_bwd(block):
        def run():
            block.zero_grad(set_to_none=True)
            (block(x) * grad).sum().backward()
        return run

    cases = {"lcc forward": fwd(mine), "hf forward": fwd(hf),
             "lcc forward+backward": fwd_bwd(mine), "hf forward+backward": fwd_bwd(hf)}
    seconds = interleaved(cases, args.repeats)
    rate = matmul_flops_per_second()
    flops_fwd = 2 * T * D * E + 2 * T * K * 3 * D * F
    result = {"benchmark": "moe_block", "shapes": {"tokens": T, "d_model": D, "experts": E, "expert_d_ff": F,
                                                   "top_k": K, "dtype": "float32"},
              "seconds": seconds, "matmul_flops_per_second": rate, "machine": machine()}
    for name, s in seconds.items():
        flops = flops_fwd * (3 if "backward" in name else 1)
        result.setdefault("tokens_per_second", {})[name] = T / s
        result.setdefault("fraction_of_matmul_rate", {})[name] = flops / s / rate
        print(f"{name:24s} {s * 1e3:8.1f} ms  {T / s:10.0f} tokens/s  {flops / s / rate:6.1%} of matmul rate")
    result["speedup"] = {"forward": seconds["hf forward"] / seconds["lcc forward"],
                         "forward+backward": seconds["hf forward+backward"] / seconds["lcc forward+backward"]}
    print(f"lcc / hf speed: forward {result['speedup']['forward']:.2f}x, "
          f"forward+backward {result['speedup']['forward+backward']:.2f}x; matmul rate {rate / 1e9:.1f} GFLOP/s")
    write("moe_block", result, args.out)


if __name__ == "__main__":
    main()
