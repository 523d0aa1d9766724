"""Which CPU kernel should run int4 expert matmuls: lcc's native kernel (`lcc.backends.cpu.int4_native`:
AVX-512 or AVX2, AMX tiles for bfloat16 segments of 16 rows or more) and PyTorch's packed int4 matmul for CPU
(`aten._weight_int4pack_mm_for_cpu`, weights converted once by `_convert_weight_to_int4pack_for_cpu`)
against lcc's reference int4 op (`lcc.backends.torch_ref.int4`: unpack and dequantize the expert, then a
dense matmul), side by side in one run.

For each expert shape (small-moe: d_model 512, expert width 512, group 64; LongCat-2.0: 4096 x 256,
group 128) and rows per expert (1: a decode step's token; 8; 64 and 256: prefill chunks), one expert's up
projection `x [rows, D] @ W [F, D]^T` and down projection `[rows, F] @ W [D, F]^T`, median seconds over
`--repeats` interleaved calls, in float32 and bfloat16 activations; the error against the reference op in
float32 is the largest absolute difference relative to the largest output. Also which group sizes the
packed kernel takes (the native kernel takes any even size). Usage: python -m benchmarks.int4_cpu [--repeats 30]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file: python benchmarks/x.py

from lcc.backends.cpu import int4_native
from lcc.backends.torch_ref.int4 import Int4Weight, dequantize, quantize, unpack_codes

from benchmarks.common import interleaved, machine, write

SHAPES = {"small-moe (512 x 512, g64)": (512, 512, 64), "longcat-2.0 (4096 x 256, g128)": (4096, 256, 128)}
ROWS = (1, 8, 64, 256)
GROUP_SIZES = (16, 32, 64, 128, 256)


def packed_for_cpu(q: Int4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed kernel's operands for a symmetric int4 weight `[out, in]`: its own packing of the codes,
    and (scale, zero) per (input group, output) with zero 0 (it computes (code - 8) x scale + zero)."""
    codes = unpack_codes(q.packed).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales = q.scales.to(torch.float32).t().contiguous()
    return packed, torch.stack([scales, torch.zeros_like(scales)], -1)


def group_sizes_taken() -> dict[int, str]:
    out = {}
    w = torch.randn(64, 256)
    for g in GROUP_SIZES:
        try:
            packed, sz = packed_for_cpu(quantize(w, g))
            torch.ops.aten._weight_int4pack_mm_for_cpu(torch.randn(2, 256), packed, g, sz)
            out[g] = "yes"
        except RuntimeError as exc:
            out[g] = f"no ({str(exc).splitlines()[0][:80]})"
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows_out = []
    for shape_name, (d, f, g) in SHAPES.items():
        for proj, (n_out, n_in) in (("up", (f, d)), ("down", (d, f))):
            q = quantize(torch.randn(n_out, n_in) * 0.02, g)
            packed, sz = packed_for_cpu(q)
            sz16 = sz.to(torch.bfloat16)
            nat = int4_native.pack(Int4Weight(q.packed[None], q.scales[None], None, g, (1, n_out, n_in)))
            for rows in ROWS:
                x = torch.randn(rows, n_in)
                x16 = x.to(torch.bfloat16)
                cases = {
                    "reference (dequantize + matmul)": lambda q=q, x=x: x @ dequantize(q).t(),
                    "packed int4, float32": lambda x=x, p=packed, s=sz, g=g: torch.ops.aten._weight_int4pack_mm_for_cpu(
                        x, p, g, s),
                    "packed int4, bfloat16": lambda x=x16, p=packed, s=sz16, g=g: (
                        torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, g, s)),
                    "native int4, float32": lambda x=x, w=nat, r=rows: int4_native.matmul_segments(x, [r], w),
                    "native int4, bfloat16": lambda x=x16, w=nat, r=rows: int4_native.matmul_segments(
                        x, [r], w, int4_native.AMX_MIN_ROWS).to(torch.bfloat16),
                }
                seconds = interleaved(cases, args.repeats)
                ref = cases["reference (dequantize + matmul)"]()
                scale = ref.abs().max()
                error = {name: float((fn().float() - ref).abs().max() / scale) for name, fn in cases.items()}
                base = seconds["reference (dequantize + matmul)"]
                row = {"shape": shape_name, "projection": proj, "rows": rows, "seconds": seconds,
                       "speedup_vs_reference": {k: base / v for k, v in seconds.items()}, "relative_error": error}
                rows_out.append(row)
                others = "; ".join(f"{k} {seconds[k] * 1e6:7.1f} us (error {error[k]:.1e})" for k in seconds
                                   if k != "reference (dequantize + matmul)")
                print(f"{shape_name:32s} {proj:4s} rows {rows:3d}: reference {base * 1e6:8.1f} us; {others}",
                      flush=True)
    taken = group_sizes_taken()
    print("group sizes the packed kernel takes: " + ", ".join(f"{g}: {v}" for g, v in taken.items()))
    write("int4_cpu", {"repeats": args.repeats, "results": rows_out, "group_sizes": taken, "machine": machine()},
          args.out)


if __name__ == "__main__":
    main()
