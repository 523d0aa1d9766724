"""The GPU script's summary: one table from the JSON files under OUT (what ran, what is pending)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(out: Path, name: str) -> dict | None:
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None


def main(out: Path) -> int:
    check, speed, runtime = (load(out, n) for n in ("kernels_check.json", "kernels_speed.json", "runtime.json"))
    print(f"\n== lcc on the GPU: summary ({out}) ==")
    if check is None or check.get("status") == "pending":
        print(f"kernel checks: PENDING ({(check or {}).get('why', 'not run')})")
    else:
        bad = [f"{c['kernel']} {c['case']}" for c in check["checks"] if not c["ok"]]
        worst = max((c["error"] / c["tolerance"] for c in check["checks"] if c["tolerance"]), default=0.0)
        print(f"kernel checks on {check['device'] if isinstance(check['device'], str) else check['device']['gpu']}: "
              f"{len(check['checks']) - len(bad)}/{len(check['checks'])} within tolerance (worst at "
              f"{worst:.0%} of its tolerance)" + (f"; FAILED: {', '.join(bad)}" if bad else ""))
    if speed is None:
        print("kernel speed: PENDING (not run)")
    else:
        roof = speed["rooflines"]
        print(f"rooflines: copy {roof['copy_gbps']:.0f} GB/s, bf16 matmul {roof['bf16_tflops']:.0f} TFLOP/s")
        print(f"{'shape':8s} {'rows':>6s} {'int4 ms':>9s} {'bf16 ms':>9s} {'grouped_mm':>10s} {'ref int4':>9s} "
              f"{'int4 %HBM':>9s} {'int4 vs gmm':>11s}")
        for r in speed["rows"]:
            t = r["ms"]
            ref = f"{t['torch_reference_int4']:9.3f}" if "torch_reference_int4" in t else f"{'-':>9s}"
            print(f"{r['shape']:8s} {r['rows']:6d} {t['lcc_int4']:9.3f} {t['lcc_bf16']:9.3f} "
                  f"{t['torch_grouped_mm_bf16']:10.3f} {ref} {r['int4_hbm_fraction']:9.0%} "
                  f"{r['int4_vs_grouped_mm']:10.2f}x")
        goals = speed["goals"]
        print("goals: int4 decode >= 70% of HBM at 64 and 256 rows: "
              f"{'met' if goals['int4_decode_70pct_hbm_at_64_256'] else 'MISSED'}; int4 prefill >= grouped_mm: "
              f"{'met' if goals['int4_prefill_at_least_grouped_mm'] else 'MISSED'}")
    if runtime is None or runtime.get("status") == "pending":
        print(f"runtime (train, generate on CUDA): PENDING ({(runtime or {}).get('why', 'not run')})")
    else:
        train = runtime.get("train_max_loss_rel_error")
        print(f"train small-moe 20 steps on {runtime['device']}: max loss error vs CPU "
              f"{'n/a' if train is None else f'{train:.1e}'} (<= {runtime['loss_rtol']}): "
              f"{'ok' if runtime.get('train_ok') else 'FAILED'}; generate float64 equal to CPU: "
              f"{'ok' if runtime.get('generate_ok') else 'FAILED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/gpu/out")))
