"""Wall time of every `lcc plan` command on LongCat-2.0 (2,048 ranks), as a user runs them (a fresh process
each, start-up included): on the compiled plan folder (goal: under 5 s each), and given the spec (goal: the
compile time plus 1 s), with `lcc compile` of the same spec timed in the same run. Median of --repeats runs,
the commands alternated.

Usage: python -m benchmarks.plan_commands [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLAN = "generated/longcat-2.0"
SPEC = "specs/longcat-2.0.yaml"


def commands(tmp: str) -> dict[str, list[str]]:
    return {
        "show": ["plan", "show", PLAN],
        "show --rank": ["plan", "show", PLAN, "--rank", "1537"],
        "show --all-ranks --json": ["plan", "show", PLAN, "--all-ranks", "--json"],
        "diff (two folders)": ["plan", "diff", PLAN, f"{PLAN}/serve"],
        "export onnx (4 roles)": ["plan", "export", PLAN, "--format", "onnx", "--out", f"{tmp}/onnx"],
        "export perfetto": ["plan", "export", PLAN, "--format", "perfetto", "--out", f"{tmp}/t.json"],
        "export dot": ["plan", "export", PLAN, "--format", "dot", "--out", f"{tmp}/p.dot"],
        "export csv": ["plan", "export", PLAN, "--format", "csv", "--out", f"{tmp}/s.csv"],
        "spec: compile": ["compile", SPEC, "--out", f"{tmp}/plan"],
        "spec: show": ["plan", "show", SPEC],
        "spec: diff --set-b zero=1": ["plan", "diff", SPEC, SPEC, "--set-b", "parallelism.zero=1"],
        "spec: report --plot": ["report", SPEC, "--plot", f"{tmp}/r.png"],
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    lcc = str(Path(sys.executable).parent / "lcc")
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cmds = commands(tmp)
        for _ in range(args.repeats):
            for name, cmd in cmds.items():
                start = time.perf_counter()
                done = subprocess.run([lcc, *cmd], cwd=ROOT, capture_output=True, text=True)
                elapsed = time.perf_counter() - start
                if done.returncode != 0:
                    print(f"{name}: exit {done.returncode}\n{done.stderr}")
                    return 1
                times.setdefault(name, []).append(elapsed)
    median = {name: statistics.median(t) for name, t in times.items()}
    compile_s = median["spec: compile"]
    for name, s in median.items():
        goal = "5 s" if not name.startswith("spec") else f"compile + 1 s = {compile_s + 1:.2f} s"
        ok = s < 5 if not name.startswith("spec") else (s <= compile_s + 1 or name == "spec: compile")
        print(f"{name:28s} {s:6.2f} s  (goal {goal}: {'met' if ok else 'MISSED'})")
    write("plan_commands", {"machine": machine(), "repeats": args.repeats, "median_seconds": median}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
