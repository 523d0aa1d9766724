"""The Triton MoE kernels on a CUDA GPU: (1) each against a float64 reference, (2) their speed against the
torch paths, with the GPU's copy bandwidth and bf16 matmul rate measured in the same run as rooflines.

1. Checks (fresh random inputs, outputs pre-filled with NaN): both alignments on the GPU equal to the
   CPU's sort-based one;
   `fused_moe` (k of 1 to 4 per token, other ranks' experts skipped, an expert without rows and one with
   one row) and `swiglu_segments` in bf16 and float32, dense and int4 (group sizes 32, 64, 128, symmetric
   and asymmetric), against tests/backends/oracle.py in float64 on the CPU.
2. Speed, rows grouped by local expert as the programs hold them after the exchange (`swiglu_segments`):
   decode (4, 16, 64, 256 routed rows) and prefill (4,096 and 16,384) at LongCat-2.0's per-rank expert
   shapes (d_model 4096, expert d_ff 256, 125 local experts, int4 group 128) and at Mixtral-8x7B's
   (d_model 4096, d_ff 14336, 8 experts). Cases: lcc's W4A16 kernels, lcc's bf16 kernels, torch's grouped
   matmul in bf16 (`torch._grouped_mm`, three calls), and lcc's torch reference path for int4 (dequantise
   each used expert, then matmul). Rows go to experts uniformly at random; the weight bytes a case must
   read are those of the experts that got rows. Each timing cycles over 8 routings so that small cases
   do not run from L2. Timings: triton.testing.do_bench, median.

Writes kernels_check.json after section 1 and kernels_speed.json after section 2 under --out.
Usage: python -m benchmarks.gpu.kernels --out DIR [--check-only] [--quick]
       TRITON_INTERPRET=1 python -m benchmarks.gpu.kernels --interpret --out DIR  (a dry run on CPU)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lcc.backends.torch_ref.int4 import Int4Weight, int4_swiglu_segments, quantize  # noqa: E402
from lcc.backends.triton.align import align, align_segments  # noqa: E402
from lcc.backends.triton.experts import ExpertStack, fused_moe, swiglu_segments  # noqa: E402

from tests.backends import oracle  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
CHECKS = [(torch.bfloat16, "dense"), (torch.bfloat16, "int4-128-sym"), (torch.bfloat16, "int4-64-asym"),
          (torch.bfloat16, "int4-32-sym"), (torch.float32, "dense"), (torch.float32, "int4-128-sym")]
SHAPES = {"longcat": {"d_model": 4096, "d_ff": 256, "experts": 125, "group": 128},
          "mixtral": {"d_model": 4096, "d_ff": 14336, "experts": 8, "group": 128}}
DECODE, PREFILL = (4, 16, 64, 256), (4096, 16384)
DEV = "cuda"  # --interpret: "cpu", the kernels run in Triton's interpreter at tiny shapes (a dry run of the script)
TINY = {"longcat": {"d_model": 128, "d_ff": 64, "experts": 5, "group": 64}}


def write(out: Path, name: str, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    if not result.get("partial"):
        print(f"wrote {out / name}", flush=True)


def device_info() -> dict:
    p = torch.cuda.get_device_properties(0)
    import triton

    return {"gpu": p.name, "multiprocessors": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}


def stacks(E: int, D: int, F: int, fmt: str, dtype: torch.dtype, gen: torch.Generator):
    """(kernel weights on the device, float64 oracle weights on the CPU)."""
    device = DEV
    raw = [torch.randn(E, F, D, generator=gen) / D**0.5, torch.randn(E, F, D, generator=gen) / D**0.5,
           torch.randn(E, D, F, generator=gen) / F**0.5]
    if fmt == "dense":
        ws = [w.to(dtype) for w in raw]
        return [ExpertStack(w.to(device)) for w in ws], [w.to(torch.float64) for w in ws]
    _, group, sym = fmt.split("-")
    qs = [quantize(w, int(group), sym == "sym") for w in raw]
    return ([ExpertStack(to_device(q, device)) for q in qs],
            [oracle.decode_int4(q.packed, q.scales, q.zeros, q.group_size) for q in qs])


def to_device(q: Int4Weight, device: str) -> Int4Weight:
    return Int4Weight(q.packed.to(device), q.scales.to(device), None if q.zeros is None else q.zeros.to(device),
                      q.group_size, q.shape)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.cpu().to(torch.float64)
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm())


def checks() -> list[tuple[torch.dtype, str]]:
    """Every case on the GPU; in the interpreter's dry run one bf16 int4 and one float32 dense case (the
    tests check every case on CPU)."""
    return CHECKS if DEV == "cuda" else [CHECKS[1], CHECKS[4]]


def guarded(rows: list, kernel: str, case: str, tolerance: float, fn) -> None:
    """One check: fn() gives its error; an exception is a failed check with its message, not the end."""
    try:
        err = fn()
        row = {"kernel": kernel, "case": case, "error": err, "tolerance": tolerance, "ok": err <= tolerance}
    except Exception as exc:  # noqa: BLE001 - recorded, and the next check runs
        row = {"kernel": kernel, "case": case, "error": float("inf"), "tolerance": tolerance, "ok": False,
               "exception": f"{type(exc).__name__}: {exc}"[:2000]}
    rows.append(row)
    print(f"  {kernel:16s} {case:26s} error {row['error']:.2e} (<= {tolerance:.0e}) {'ok' if row['ok'] else 'FAILED'}"
          + (f" {row['exception'][:300]}" if "exception" in row else ""), flush=True)


def check(out: Path | None = None) -> dict:
    gen = torch.Generator().manual_seed(0)
    rows: list = []
    ids = torch.randint(-1, 40, (3000,), generator=gen)

    def same(a, b) -> float:
        return 0.0 if torch.equal(a.rows, b.rows.cpu()) and torch.equal(a.block_expert, b.block_expert.cpu()) else 1.0

    guarded(rows, "align", "3000 rows, 37 experts, block 16", 0.0,
            lambda: same(align(ids, 37, 16), align(ids.to(DEV), 37, 16)))
    counts = torch.bincount(ids[ids >= 0] % 37, minlength=37)  # rows grouped by expert, some experts empty
    counts[::5] = 0
    guarded(rows, "align_segments", f"{int(counts.sum())} rows, 37 experts, block 16", 0.0,
            lambda: same(align(torch.repeat_interleave(torch.arange(37), counts), 37, 16),
                         align_segments(counts.to(DEV), int(counts.sum()), 16)))
    E, D, F, T, K, first = (8, 512, 256, 300, 4, 3) if DEV == "cuda" else (8, 128, 128, 40, 4, 3)
    for dtype, fmt in checks():
        name = f"{str(dtype).split('.')[1]} {fmt}"
        ws, ref = stacks(E, D, F, fmt, dtype, gen)
        x = torch.randn(T, D, generator=gen).to(dtype)
        experts_TK = torch.randint(0, 16, (T, K), generator=gen)
        experts_TK[experts_TK == first] = first + 2  # local expert 0 gets no rows, local expert 1 one
        experts_TK[experts_TK == first + 1] = first + 3
        experts_TK[0, 0] = first + 1
        mask_TK = torch.arange(K).unsqueeze(0) < (1 + torch.arange(T) % K).unsqueeze(1)
        gates_TK = torch.rand(T, K, generator=gen)

        def fused(x=x, experts_TK=experts_TK, gates_TK=gates_TK, mask_TK=mask_TK, ws=ws, ref=ref) -> float:
            slots = torch.full((T * K, D), float("nan"), device=DEV)
            y = fused_moe(x.to(DEV), experts_TK.to(DEV), gates_TK.to(DEV), mask_TK.to(DEV), *ws, first_expert=first,
                          slots=slots)
            return rel(y, oracle.moe(x, experts_TK, gates_TK, mask_TK, *ref, first))

        guarded(rows, "fused_moe", name, TOL[dtype], fused)
    sizes = [0, 1, 17, 90, 5, 0, 130, 40] if DEV == "cuda" else [0, 1, 17, 3, 5, 0, 20, 4]
    for dtype, fmt in checks():  # rows grouped by expert: one without rows, one with one, some past a block
        name = f"{str(dtype).split('.')[1]} {fmt}"
        ws, ref = stacks(E, D, F, fmt, dtype, gen)
        xs = torch.randn(sum(sizes), D, generator=gen).to(dtype)

        def segments(xs=xs, ws=ws, ref=ref, dtype=dtype) -> float:
            out = torch.full((sum(sizes), D), float("nan"), dtype=dtype, device=DEV)
            y = swiglu_segments(xs.to(DEV), torch.tensor(sizes, device=DEV), *ws, out=out)
            return rel(y, oracle.segments(xs, sizes, *ref))

        guarded(rows, "swiglu_segments", name, TOL[dtype], segments)
        if out is not None:  # what has run so far, in case a later case hangs the GPU
            write(out, "kernels_check.json", {"checks": rows, "ok": False, "partial": True})
    sync()
    return {"checks": rows, "ok": all(r["ok"] for r in rows)}


def ms(fn, warmup: int = 10, rep: int = 50) -> float:
    if DEV != "cuda":  # the interpreter: one call, timed on the host
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def rooflines() -> dict:
    n = 1 << 30 if DEV == "cuda" else 1 << 20  # 1 GiB copied (2 GiB moved), several times the L2
    src = torch.randn(n // 2, device=DEV, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = ms(lambda: dst.copy_(src))
    m = 8192 if DEV == "cuda" else 256
    x = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    y = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    mm_ms = ms(lambda: x @ y)
    return {"copy_gbps": 2 * n / copy_ms / 1e6, "bf16_tflops": 2 * m**3 / mm_ms / 1e9}


def grouped_mm_bf16(x, offs, w1t, w3t, w2t):
    a = torch._grouped_mm(x, w1t, offs=offs)
    b = torch._grouped_mm(x, w3t, offs=offs)
    return torch._grouped_mm(torch.nn.functional.silu(a) * b, w2t, offs=offs)


class Weights:
    """One shape's expert weights on the GPU: int4 (group `group`) and bf16, as the kernels and torch take them."""

    def __init__(self, E: int, D: int, F: int, group: int):
        gen = torch.Generator(device=DEV).manual_seed(2)  # drawn and quantised on the device: seconds, not minutes
        dense = [torch.randn(E, F, D, generator=gen, device=DEV) / D**0.5,
                 torch.randn(E, F, D, generator=gen, device=DEV) / D**0.5,
                 torch.randn(E, D, F, generator=gen, device=DEV) / F**0.5]
        self.q = [quantize(w, group) for w in dense]
        self.bf = [w.to(torch.bfloat16) for w in dense]
        del dense
        self.int4_stacks = [ExpertStack(w) for w in self.q]
        self.bf_stacks = [ExpertStack(w) for w in self.bf]
        self.bf_t = [w.transpose(1, 2) for w in self.bf]
        self.per_expert_int4 = sum(w.nbytes for w in self.q) / E
        self.per_expert_bf16 = sum(w.numel() * 2 for w in self.bf) / E
        self.E, self.D, self.F = E, D, F


class Routings:
    """8 random routings of R rows to E experts (x, counts, group ends), taken in turn."""

    def __init__(self, R: int, w: Weights, gen: torch.Generator):
        self.sets, self.i = [], 0
        for _ in range(8):
            counts = torch.bincount(torch.randint(0, w.E, (R,), generator=gen), minlength=w.E)
            self.sets.append((torch.randn(R, w.D, generator=gen).to(torch.bfloat16).to(DEV), counts.to(DEV),
                              counts.cumsum(0).to(torch.int32).to(DEV)))
        self.touched = sum(int((c > 0).sum()) for _, c, _ in self.sets) / len(self.sets)

    def next(self):
        self.i = (self.i + 1) % len(self.sets)
        return self.sets[self.i]


def cases(w: Weights, r: Routings, reference: bool) -> dict:
    def lcc_int4():
        x, counts, _ = r.next()
        return swiglu_segments(x, counts, *w.int4_stacks)

    def lcc_bf16():
        x, counts, _ = r.next()
        return swiglu_segments(x, counts, *w.bf_stacks)

    def torch_grouped_mm_bf16():
        x, _, offs = r.next()
        return grouped_mm_bf16(x, offs, *w.bf_t)

    def torch_reference_int4():
        x, counts, _ = r.next()
        return int4_swiglu_segments(x, counts, *w.q)

    out = {"lcc_int4": lcc_int4, "lcc_bf16": lcc_bf16, "torch_grouped_mm_bf16": torch_grouped_mm_bf16}
    if reference:  # a loop over experts with a host sync: slow at prefill sizes
        out["torch_reference_int4"] = torch_reference_int4
    return out


def time_rows(shape: str, w: Weights, R: int, roof: dict, gen: torch.Generator) -> dict:
    r = Routings(R, w, gen)
    times, first = {}, {}
    for name, fn in cases(w, r, reference=R <= 4096).items():
        start = time.perf_counter()
        fn()
        sync()
        first[name] = time.perf_counter() - start  # compiling the kernels for this shape class included
        times[name] = ms(fn)
    w_int4, w_bf16 = r.touched * w.per_expert_int4, r.touched * w.per_expert_bf16
    act = R * w.D * 2 * 2  # activations in and out, bf16
    flops = 2 * R * 3 * w.D * w.F
    hbm = roof["copy_gbps"] * 1e9
    row = {"shape": shape, "rows": R, "experts_touched": r.touched, "int4_weight_bytes": w_int4,
           "bf16_weight_bytes": w_bf16, "flops": flops, "ms": times, "first_call_s": first,
           "int4_hbm_fraction": (w_int4 + act) / (times["lcc_int4"] * 1e-3) / hbm,
           "bf16_hbm_fraction": (w_bf16 + act) / (times["lcc_bf16"] * 1e-3) / hbm,
           "int4_vs_grouped_mm": times["torch_grouped_mm_bf16"] / times["lcc_int4"],
           "bf16_vs_grouped_mm": times["torch_grouped_mm_bf16"] / times["lcc_bf16"],
           "int4_tflops": flops / (times["lcc_int4"] * 1e-3) / 1e12}
    print(f"  {shape:8s} rows {R:6d}: int4 {times['lcc_int4']:.3f} ms ({row['int4_hbm_fraction']:.0%} of HBM on its "
          f"weights), bf16 {times['lcc_bf16']:.3f} ms, grouped_mm {times['torch_grouped_mm_bf16']:.3f} ms "
          f"(int4 {row['int4_vs_grouped_mm']:.2f}x)", flush=True)
    return row


def speed(quick: bool, out: Path | None = None) -> dict:
    gen = torch.Generator().manual_seed(1)
    roof = rooflines()
    print(f"  rooflines: copy {roof['copy_gbps']:.0f} GB/s, bf16 matmul {roof['bf16_tflops']:.0f} TFLOP/s", flush=True)
    rows = []
    sizes = (64, 4096) if quick else DECODE + PREFILL
    failed = []
    for shape, s in (SHAPES if DEV == "cuda" else TINY).items():
        w = Weights(s["experts"], s["d_model"], s["d_ff"], s["group"])
        for R in (sizes if DEV == "cuda" else (4, 70)):
            try:
                rows.append(time_rows(shape, w, R, roof, gen))
            except Exception as exc:  # noqa: BLE001 - recorded; the other sizes still run
                failed.append({"shape": shape, "rows": R, "exception": f"{type(exc).__name__}: {exc}"[:2000]})
                print(f"  {shape:8s} rows {R:6d}: FAILED {failed[-1]['exception'][:300]}", flush=True)
            if out is not None:
                write(out, "kernels_speed.json", {"rooflines": roof, "rows": rows, "failed": failed, "partial": True})
        del w
        if DEV == "cuda":
            torch.cuda.empty_cache()
    decode_ok = all(r["int4_hbm_fraction"] >= 0.7 for r in rows if r["rows"] in (64, 256))
    prefill_ok = all(r["int4_vs_grouped_mm"] >= 1.0 for r in rows if r["rows"] in PREFILL)
    return {"rooflines": roof, "rows": rows, "failed": failed,
            "goals": {"int4_decode_70pct_hbm_at_64_256": decode_ok, "int4_prefill_at_least_grouped_mm": prefill_ok}}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/gpu/out")
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("--quick", action="store_true", help="one decode and one prefill size per shape")
    parser.add_argument("--interpret", action="store_true",
                        help="dry run on CPU: the kernels in Triton's interpreter at tiny shapes (nothing measured)")
    args = parser.parse_args()
    out = Path(args.out)
    if args.interpret:
        global DEV
        DEV = "cpu"
        result = check(out)
        write(out, "kernels_check.json", {"device": "cpu (Triton interpreter)", **result})
        write(out, "kernels_speed.json", {"device": "cpu (Triton interpreter)", **speed(True, out)})
        return 0 if result["ok"] else 1
    if not torch.cuda.is_available():
        why = "no CUDA device (torch.cuda.is_available() is False)"
        print(f"kernels: PENDING, {why}: the compiled kernels are checked and timed on a GPU only "
              "(tests/backends checks them on CPU through Triton's interpreter)", flush=True)
        write(out, "kernels_check.json", {"status": "pending", "why": why})
        return 2
    from lcc.backends.triton import available

    if available() is not None:
        print(f"kernels: cannot run: {available()}", flush=True)
        return 1
    info = device_info()
    print(f"kernels on {info['gpu']} (torch {info['torch']}, triton {info['triton']})", flush=True)
    start = time.perf_counter()
    result = check(out)
    write(out, "kernels_check.json", {"device": info, **result, "seconds": time.perf_counter() - start})
    if args.check_only or not result["ok"]:
        return 0 if result["ok"] else 1
    start = time.perf_counter()
    write(out, "kernels_speed.json", {"device": info, **speed(args.quick, out), "seconds": time.perf_counter() - start})
    return 0


if __name__ == "__main__":
    sys.exit(main())
