"""Compile every Triton MoE kernel for Hopper (sm_90) on this machine, no GPU needed: each kernel in each
weight format and tile class the table in lcc/backends/triton/configs.py gives, with the alignment Triton
assumes at launch (16-byte pointers and strides). Reports, per variant: shared memory, registers and the
stack frame (spills; Triton's bundled cuobjdump), scalar byte loads, asynchronous copies, and tensor-core
instructions (wgmma or mma.sync). A variant over the multiprocessor's 227 KiB of shared memory, or one
that spills, fails.

What it cannot say: the speed. benchmarks/gpu/run.sh measures that on a GPU.
Usage: python -m benchmarks.gpu.compile_sm90 [--out FILE] [--only decode] [--quick]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SHARED_LIMIT = 227 * 1024
# (name, rows per expert on average: picks the tile class) at LongCat-2.0's expert shapes (d 4096, d_ff 256)
CLASSES = {"decode": 2, "small": 40, "medium": 200, "prefill": 1000}
FORMATS = {  # name: (activations, weights, scales, int4, zeros)
    "int4": ("bf16", "u8", "fp16", True, False), "int4-asym": ("bf16", "u8", "fp16", True, True),
    "bf16": ("bf16", "bf16", "bf16", False, False), "fp32": ("fp32", "fp32", "fp32", False, False)}
GEMM_ARGS = ["n_rows", "N", "K"]
ALIGNED = ("K", "N", "stride_xm", "stride_hm", "stride_om", "stride_we", "stride_wn")


def _signature(kernel, fmt: str) -> dict[str, str]:
    act, w, s, _, _ = FORMATS[fmt]
    types = {"x_ptr": f"*{act}", "h_ptr": f"*{act}", "out_ptr": f"*{act}", "weight_ptr": "*fp32",
             "rows_ptr": "*i32", "block_expert_ptr": "*i32", "counts_ptr": "*i64"}
    out = {}
    for name in kernel.arg_names:
        if name in types:
            out[name] = types[name]
        elif name.startswith(("w1", "w2", "w3")):
            out[name] = f"*{w}"
        elif name.startswith(("s1", "s2", "s3", "z1", "z2", "z3")):
            out[name] = f"*{s}" if name[0] == "s" or fmt != "int4-asym" else "*u8"
        elif kernel.params[kernel.arg_names.index(name)].is_constexpr:
            out[name] = "constexpr"
        else:
            out[name] = "i32"
    return out


def compile_one(kernel, fmt: str, constants: dict, warps: int, stages: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = _signature(kernel, fmt)
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if (n.endswith("_ptr") and n != "counts_ptr") or n in ALIGNED}
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(kernel, sig, constants, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})
    seconds = time.perf_counter() - start
    ptx = compiled.asm["ptx"]
    ops = collections.Counter(re.findall(r"(ld\.global\.b8|cp\.async\.c[ag]|wgmma\.mma_async|mma\.sync)", ptx))
    regs, spills = _resources(compiled.asm["cubin"])
    return {"shared_bytes": compiled.metadata.shared, "registers": regs, "spill_bytes": spills,
            "byte_loads": ops["ld.global.b8"], "async_copies": ops["cp.async.cg"] + ops["cp.async.ca"],
            "wgmma": ops["wgmma.mma_async"], "mma_sync": ops["mma.sync"], "compile_s": round(seconds, 2)}


def _resources(cubin: bytes) -> tuple[int | None, int | None]:
    """Registers and spill bytes per thread of a compiled kernel (cuobjdump --dump-resource-usage)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        done = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True)
    regs = re.search(r"REG:(\d+)", done.stdout)
    stack = re.search(r"STACK:(\d+)", done.stdout)
    return (int(regs.group(1)) if regs else None), (int(stack.group(1)) if stack else None)


def variants(only: str | None, quick: bool = False):
    from lcc.backends.triton import kernels
    from lcc.backends.triton.configs import tiles_for

    D, F, E = 4096, 256, 125
    for cls, per in CLASSES.items():
        if only and cls != only:
            continue
        rows = per * E
        if quick and cls not in ("decode", "prefill"):
            continue
        for fmt, (act, _, _, int4, zeros) in FORMATS.items():
            if quick and fmt != "int4":
                continue
            a_bytes = 4 if act == "fp32" else 2
            w_bytes = 0.5 if int4 else a_bytes
            group = 128 if int4 else None
            common = {"INT4": int4, "HAS_ZEROS": zeros, "GROUP": group or 1, "IEEE": act == "fp32", "UPCAST": False}
            t = tiles_for(rows, E, D, group, a_bytes, w_bytes, weight_tiles=2)
            yield (f"gate_up {cls} {fmt}", kernels.gate_up_swiglu_kernel, fmt,
                   {**common, "BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_K": t.block_k}, t)
            t2 = tiles_for(rows, E, F, group, a_bytes, w_bytes)
            yield (f"down {cls} {fmt}", kernels.down_kernel, fmt,
                   {**common, "HAS_WEIGHT": True, "BLOCK_M": t.block_m, "BLOCK_N": t2.block_n, "BLOCK_K": t2.block_k},
                   t2)
    if not only or only == "decode":
        from lcc.backends.triton.configs import Tiles

        yield ("align_segments", kernels.align_segments_kernel, "int4", {"BLOCK_M": 16, "EXPERTS": 128, "CHUNK": 32},
               Tiles(16, 0, 0, 4, 1))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--only", choices=list(CLASSES))
    parser.add_argument("--quick", action="store_true", help="int4 at decode and prefill, and the alignment")
    args = parser.parse_args()
    rows, ok = [], True
    for name, kernel, fmt, constants, tiles in variants(args.only, args.quick):
        r = compile_one(kernel, fmt, constants, tiles.num_warps, tiles.num_stages)
        r.update(name=name, tiles=[tiles.block_m, tiles.block_n, tiles.block_k, tiles.num_warps, tiles.num_stages])
        bad = r["shared_bytes"] > SHARED_LIMIT or (r["spill_bytes"] or 0) > 0
        ok &= not bad
        rows.append(r)
        print(f"{name:24s} tiles {r['tiles']} shared {r['shared_bytes'] / 1024:6.1f} KiB regs {r['registers']} "
              f"spills {r['spill_bytes']} byte-loads {r['byte_loads']} async {r['async_copies']} "
              f"wgmma {r['wgmma']} mma {r['mma_sync']}{'  FAILS' if bad else ''}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"target": "sm_90", "variants": rows, "ok": ok}, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
