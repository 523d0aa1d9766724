"""Routing at LongCat-2.0 shapes on CPU: hierarchical, group-major routing against scoring every expert.

d_model 4096, 16,000 experts in 128 groups, 4 kept groups, k from 1 to 4, 256 tokens, float32.
Cases, round-robin in one run:
- lcc router: cosine group affinity, logits for the 4 kept groups' 500 experts only (one matmul per group
  over the tokens that kept it), least-loaded ranking, dynamic k;
- all experts: logits for all 16,000 experts, softmax, top-4 (what a flat router does);
- experts' own arithmetic for the same routed slots (3 matmuls of 4096 x 256 per slot, grouped over 64
  expert weight sets: the FLOPs of the real experts without 50 GB of weights).
Usage: python benchmarks/routing.py [--repeats 9] [--threads 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file: python benchmarks/x.py

from benchmarks.common import interleaved, machine, timing_args, write
from lcc.model.moe import swiglu_segments
from lcc.model.routing import Router
from lcc.spec import load_spec

SPECS = Path(__file__).resolve().parents[1] / "specs"
T = 256
EXPERTS = "experts' arithmetic"


def main() -> None:
    args = timing_args(repeats=9)
    spec = load_spec(SPECS / "longcat-2.0.yaml")
    moe, routing = spec.model.moe, spec.routing
    D, E = spec.model.d_model, moe.n_experts
    g = torch.Generator().manual_seed(0)
    router = Router(D, moe, routing)
    with torch.no_grad():
        router.centroids_GD.copy_(torch.randn(router.centroids_GD.shape, generator=g))
        router.weight_ED.copy_(torch.randn(router.weight_ED.shape, generator=g) * 0.02)
        router.bias_E.copy_(torch.randn(E, generator=g, dtype=torch.float64) * 1e-3)
    x = torch.randn(T, D, generator=g)

    @torch.no_grad()
    def lcc_router():
        return router(x)

    @torch.no_grad()
    def all_experts():
        probs = torch.softmax(x @ router.weight_ED.T, dim=-1)
        return torch.topk(probs, routing.k.max, dim=-1)

    slots = int(lcc_router().mask_TK.sum())
    n_sets = 64
    w1 = torch.randn(n_sets, moe.expert_d_ff, D, generator=g) * 0.02
    w3 = torch.randn(n_sets, moe.expert_d_ff, D, generator=g) * 0.02
    w2 = torch.randn(n_sets, D, moe.expert_d_ff, generator=g) * 0.02
    xs = torch.randn(slots, D, generator=g)
    counts = [slots // n_sets + (i < slots % n_sets) for i in range(n_sets)]

    @torch.no_grad()
    def experts():
        return swiglu_segments(xs, counts, w1, w3, w2)

    seconds = interleaved({"lcc router": lcc_router, "all experts + top-k": all_experts,
                           EXPERTS: experts}, args.repeats)
    ratio = seconds["lcc router"] / seconds["all experts + top-k"]
    for name, s in seconds.items():
        print(f"{name:22s} {s * 1e3:8.1f} ms")
    print(f"lcc router / all experts = {ratio:.3f} (required <= 0.2); routed slots {slots} "
          f"({slots / T:.2f} experts per token); router / experts' arithmetic = "
          f"{seconds['lcc router'] / seconds[EXPERTS]:.2f}")
    write("routing", {"benchmark": "routing", "tokens": T, "d_model": D, "experts": E, "groups": moe.n_groups,
                      "kept_groups": routing.groups.top, "k_max": routing.k.max, "routed_slots": slots,
                      "seconds": seconds, "router_vs_all_experts": ratio,
                      "router_vs_expert_arithmetic": seconds["lcc router"] / seconds[EXPERTS],
                      "machine": machine()}, args.out)


if __name__ == "__main__":
    main()
