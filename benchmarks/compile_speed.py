"""Wall time of `lcc compile specs/longcat-2.0.yaml` (2,048 ranks), process start included, next to the
same spec with dp, cluster.nodes and train.global_batch x8 (16,384 ranks); and the size of the plan.
Targets: at most 10 s; the x8 layout at most 2x that; generated/longcat-2.0/ at most 5 MB.
Usage: python benchmarks/compile_speed.py [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file: python benchmarks/x.py

from benchmarks.common import machine, write

ROOT = Path(__file__).resolve().parents[1]
X8 = ["--set", "parallelism.dp=512", "--set", "cluster.nodes=2048", "--set", "train.global_batch=32768"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    lcc = str(Path(sys.executable).with_name("lcc"))
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cases = {"2,048 ranks": [lcc, "compile", "specs/longcat-2.0.yaml", "--out", f"{tmp}/a"],
                 "16,384 ranks": [lcc, "compile", "specs/longcat-2.0.yaml", *X8, "--out", f"{tmp}/b"]}
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.runs):
            for name, cmd in cases.items():
                start = time.perf_counter()
                subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
                times[name].append(time.perf_counter() - start)
        for name, folder in (("2,048 ranks", "a"), ("16,384 ranks", "b")):
            size = sum(p.stat().st_size for p in (Path(tmp) / folder).rglob("*") if p.is_file())
            results[name] = {"median_s": statistics.median(times[name]), "max_s": max(times[name]), "bytes": size}
            print(f"{name:14s} median {results[name]['median_s']:.2f} s  max {results[name]['max_s']:.2f} s  "
                  f"plan {size / 1e6:.2f} MB")
    ratio = results["16,384 ranks"]["median_s"] / results["2,048 ranks"]["median_s"]
    print(f"16,384 / 2,048 ranks: {ratio:.2f}x")
    write("compile_speed", {"benchmark": "compile_speed", "results": results, "ratio_x8": ratio,
                            "machine": machine()})


if __name__ == "__main__":
    main()
