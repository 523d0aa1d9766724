"""Wall time of `lcc plan search` on LongCat-2.0 at 2,048 GPUs as a user runs it (a fresh process, start-up
included; goal: under 30 s), all layouts and with --fix parallelism.tp=8, with the search's counts.

Usage: python -m benchmarks.plan_search [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = {"all layouts": [], "--fix parallelism.tp=8": ["--fix", "parallelism.tp=8"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out")
    args = parser.parse_args()
    results = {}
    for name, extra in CASES.items():
        command = [sys.executable, "-m", "lcc", "plan", "search", "specs/longcat-2.0.yaml", "--gpus", "2048",
                   "--top", "5", "--json", *extra]
        start = time.perf_counter()
        out = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout
        seconds = time.perf_counter() - start
        data = json.loads(out)
        best = data["top"][0]
        results[name] = {"seconds": round(seconds, 2), **{k: data[k] for k in ("considered", "invalid",
                         "pruned_memory", "pruned_time", "evaluated", "fitting")},
                         "best": best["layout"], "best_step_seconds": best["step_seconds"], "best_mfu": best["mfu"]}
        print(f"{name}: {seconds:.1f} s; {data['considered']:,} layouts, {data['evaluated']:,} estimated; best "
              f"{best['step_seconds']:.3f} s ({best['layout']})")
    write("plan_search", {"machine": machine(), "cases": results}, args.out)


if __name__ == "__main__":
    main()
