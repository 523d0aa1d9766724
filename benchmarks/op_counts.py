"""The operations one layer dispatches to PyTorch in `lcc run train` (forward and backward, views included),
against the counts the calibrated cost model charges a fixed cost each for (lcc.compiler.cost.measured.OPS).

small-moe (dp 4, ep 4, float32; train.global_batch=4, train.seq_len=128) is run three times for 5 steps:
8 MoE layers, 4 MoE layers, and 4 MoE + 4 dense layers (d_ff 1024). Rank 0's steps 2-5 (the first creates
the optimizer's states; the count varies from step to step with the routing) are counted with a
TorchDispatchMode installed in each rank through a sitecustomize module on PYTHONPATH. From the three totals:
an MoE layer (attention, shared expert, routing, exchange, experts), a dense layer (attention, SwiGLU FFN),
and what a step dispatches besides its layers (embedding, head, loss, optimizer).

Usage: python -m benchmarks.op_counts [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = ["train.global_batch=4", "train.seq_len=128", "parallelism.ep=4"]
STEPS = 5
RUNS = {"moe8": [], "moe4": ["model.n_layers=4"], "moe4_dense4": ["model.moe.layers=[0,1,2,3]", "model.ffn.d_ff=1024"]}

COUNTER = '''
import builtins, os, sys
_import = builtins.__import__
def _patch():
    from lcc.runtime import engine
    step_fn = engine.RankEngine.train_step
    def counted(self, step):
        if step < 1 or os.environ.get("RANK", "0") != "0":
            return step_fn(self, step)
        from torch.utils._python_dispatch import TorchDispatchMode
        class Count(TorchDispatchMode):
            calls = 0
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                Count.calls += 1
                return func(*args, **(kwargs or {}))
        with Count():
            out = step_fn(self, step)
        with open(os.environ["LCC_OP_COUNT"], "a") as f:
            print(Count.calls, file=f)
        return out
    engine.RankEngine.train_step = counted
def _hook(name, *a, **k):
    module = _import(name, *a, **k)
    found = sys.modules.get("lcc.runtime.engine")
    if found is not None and hasattr(found, "RankEngine") and not getattr(found, "_counted", False):
        found._counted = True
        _patch()
    return module
builtins.__import__ = _hook
'''


def count(name: str, overrides: list[str], work: Path) -> float:
    """Rank 0's dispatches per step, the mean over every step but the first."""
    out = work / f"{name}.count"
    env = {**os.environ, "PYTHONPATH": f"{work}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "LCC_OP_COUNT": str(out)}
    sets = [a for o in [*BASE, *overrides] for a in ("--set", o)]
    subprocess.run([sys.executable, "-m", "lcc", "run", "train", str(ROOT / "specs" / "small-moe.yaml"), *sets,
                    "--steps", str(STEPS)], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    counts = [int(line) for line in out.read_text().split()]
    return sum(counts) / len(counts)


def main() -> None:
    from lcc.compiler.cost.measured import OPS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "sitecustomize.py").write_text(COUNTER)
        totals = {name: count(name, overrides, work) for name, overrides in RUNS.items()}
    moe = (totals["moe8"] - totals["moe4"]) / 4
    dense = (totals["moe4_dense4"] - totals["moe4"]) / 4
    step = totals["moe4"] - 4 * moe
    counted = {"moe_layer": moe, "dense_layer": dense, "step": step}
    charged = {"moe_layer": OPS["attention"] + OPS["ffn"] + OPS["moe"], "dense_layer": OPS["attention"] + OPS["ffn"],
               "step": OPS["step"]}
    for key in counted:
        print(f"{key:12s} counted {counted[key]:7.1f}  charged {charged[key]:5d}")
    print("totals per step: " + ", ".join(f"{k} {v:.0f}" for k, v in totals.items()))
    write("op_counts", {"totals": totals, "counted": counted, "charged": charged, "machine": machine()}, args.out)


if __name__ == "__main__":
    main()
