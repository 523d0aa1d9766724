"""Wall time of `lcc report specs/longcat-2.0.yaml`, process start included (target: under 2 s).

Runs the command N times as a user would (a new Python process each time) and writes JSON.
Usage: python benchmarks/report_speed.py [--runs 10] [--out benchmarks/results/report_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def time_command(cmd: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "report_speed.json"))
    args = parser.parse_args()
    lcc = str(Path(sys.executable).with_name("lcc"))
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "lcc report longcat-2.0": [lcc, "report", "specs/longcat-2.0.yaml"],
        "lcc report longcat-2.0 --json": [lcc, "report", "specs/longcat-2.0.yaml", "--json"],
        "lcc validate longcat-2.0": [lcc, "validate", "specs/longcat-2.0.yaml"],
        "lcc report longcat-2.0 x8 (16,384 ranks)": [lcc, "report", "specs/longcat-2.0.yaml", "--set",
                                                     "parallelism.dp=512", "--set", "cluster.nodes=2048", "--set",
                                                     "train.global_batch=32768"],
    }
    results = {}
    for name, cmd in cases.items():
        times = time_command(cmd, args.runs)
        results[name] = {"median_s": statistics.median(times), "max_s": max(times), "runs": args.runs}
        print(f"{name:42s} median {results[name]['median_s']:.3f} s  max {results[name]['max_s']:.3f} s")
    out = {"benchmark": "report_speed", "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                    "python": platform.python_version()}, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
