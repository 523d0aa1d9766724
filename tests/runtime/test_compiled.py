"""train.compile: inductor: the plan's layer functions compiled with torch.compile, against the same plan run
eagerly (docs/runtime.md, "Compiled programs")."""

from __future__ import annotations

import json

import pytest
import torch

from lcc.compiler.output import write
from lcc.compiler.plan import compile_plan
from lcc.plan.codec import read_plan
from lcc.plan.op_table import OPS, untraced
from lcc.plan.program_check import ProgramMismatch, check_programs
from lcc.runtime import transcript
from lcc.runtime.launch import check_plan, launch, read_metrics
from lcc.runtime.preflight import LaunchRefused
from lcc.spec import load_spec
from tests.conftest import SPECS
from tests.layouts import LAYOUTS
from tests.runtime.transcript_oracle import check_rank

F32 = ["train.dtype=float32", "train.seq_len=32", "train.global_batch=16", "train.optimizer.warmup_steps=2",
       "model.moe.n_experts=16", "model.moe.n_groups=4"]
STEPS = 20
# compiled against eager, float32, 20 steps: Inductor fuses element-wise work and rounds in another order.
# Measured at most 9.2e-8 relative on the losses and 1.0e-6 (norm-relative) on step-1 gradients over the
# three layouts; a wrong fusion or a lost term is far above these
LOSS_TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-5
# world 1; tensor parallel (all-reduces inside every layer); ZeRO-3 with selective recomputation and
# experts over two ranks (gathers, recomputation and the all-to-all inside every layer)
COMPILED_LAYOUTS = {"world1": LAYOUTS["world1"], "tp2": LAYOUTS["tp2"],
                    "dp2_ep2_zero3_selective": [*LAYOUTS["dp2_ep2"], "parallelism.zero=3",
                                                "parallelism.activation_checkpointing=selective"]}


def _run(spec, tmp_path, name: str, monkeypatch) -> tuple[list[dict], dict[int, dict[str, torch.Tensor]], dict]:
    out = tmp_path / name
    write(compile_plan(spec), out / "plan")
    monkeypatch.setenv("LCC_DUMP_GRADS", str(out))
    launch(out / "plan", STEPS, out / "metrics.jsonl", quiet=True, transcript=out / "transcript.jsonl")
    grads = {r: torch.load(out / f"grads_rank{r}.pt") for r in range(spec.parallelism.world_size)}
    return read_metrics(out / "metrics.jsonl"), grads, json.loads((out / "plan" / "plan.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", list(COMPILED_LAYOUTS))
def test_compiled_run_agrees_with_eager(layout, tmp_path, monkeypatch):
    """20 steps' losses and every rank's step-1 gradients within the tolerances, the compile time reported
    apart, and every rank's collectives exactly as the plan lists them."""
    spec = load_spec(SPECS / "tiny-moe.yaml", [*F32, *COMPILED_LAYOUTS[layout]])
    eager, eager_grads, _ = _run(spec.model_copy(update={"train": spec.train.model_copy(update={"compile": "none"})}),
                                 tmp_path, "eager", monkeypatch)
    compiled_spec = spec.model_copy(update={"train": spec.train.model_copy(update={"compile": "inductor"})})
    records, grads, plan = _run(compiled_spec, tmp_path, "compiled", monkeypatch)
    assert all(role["compiled"] for role in plan["roles"])
    assert [m["loss"] for m in records] == pytest.approx([m["loss"] for m in eager], rel=LOSS_TOLERANCE, abs=0)
    assert records[0]["compile_seconds"] > 0 and "compile_seconds" not in eager[0]
    for rank, mine in grads.items():
        for name, g in mine.items():
            want = eager_grads[rank][name]
            error = (g - want).norm() / want.norm().clamp(min=1e-30)
            assert error <= GRAD_TOLERANCE or (g - want).norm() == 0, (rank, name, float(error))
    issued = transcript.read(tmp_path / "compiled" / "transcript.jsonl")
    for rank in range(spec.parallelism.world_size):
        check_rank(plan, issued, rank, step=1)


def test_the_plan_and_the_programs_say_what_is_compiled(tmp_path):
    spec = load_spec(SPECS / "tiny-moe.yaml", [*F32, *LAYOUTS["pp2"], "train.compile=inductor"])
    files = compile_plan(spec)
    plan = read_plan_files(files, tmp_path)
    assert [r.compiled for r in plan.roles] == [["layer_0", "layer_1"], ["layer_2", "layer_3"]]
    assert "COMPILED = ['layer_2', 'layer_3']" in files["programs/stage1.py"]
    bad = dict(files)
    bad["programs/stage1.py"] = files["programs/stage1.py"].replace("COMPILED = ['layer_2', 'layer_3']",
                                                                    "COMPILED = ['layer_2']")
    programs = {k: v for k, v in bad.items() if k.startswith("programs/")}
    with pytest.raises(ProgramMismatch, match="COMPILED is \\['layer_2'\\], the plan's role compiles"):
        check_programs(plan, programs)
    # float64 verification runs and serve plans stay eager
    for overrides in (["train.dtype=float64"], ["train.compile=none"]):
        eager = compile_plan(load_spec(SPECS / "tiny-moe.yaml", [*F32, *LAYOUTS["pp2"], "train.compile=inductor",
                                                                 *overrides]))
        assert "COMPILED" not in eager["programs/stage0.py"]
        assert all(not r["compiled"] for r in json.loads(eager["plan.json"])["roles"])


def read_plan_files(files: dict[str, str], tmp_path):
    write(files, tmp_path / "plan")
    return read_plan(tmp_path / "plan")


def test_a_compiling_plan_without_a_cxx_compiler_is_refused_with_the_fix(tmp_path, monkeypatch):
    spec = load_spec(SPECS / "tiny-moe.yaml", [*F32, *LAYOUTS["world1"], "train.compile=inductor"])
    write(compile_plan(spec), tmp_path / "plan")
    check_plan(tmp_path / "plan")  # this machine has one
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(LaunchRefused, match="needs a C\\+\\+ compiler.*--set train.compile=none"):
        check_plan(tmp_path / "plan")


def test_collectives_and_value_sized_ops_end_compiled_regions():
    """What torch.compile must not trace: every op that communicates, gathers or recomputes, and the ops
    whose output shapes follow tensor values."""
    ends = set(untraced())
    assert {o.name for o in OPS.values() if o.kind != "compute"} <= ends
    assert {"route", "grouped_swiglu", "grouped_swiglu_int4"} <= ends
    assert {"linear", "attention", "rms_norm", "combine_tokens"}.isdisjoint(ends)


def test_many_micro_batches_run_compiled_without_recompiling_each_one(tmp_path, monkeypatch):
    """Nothing a compiled layer traces depends on the micro-batch's index: ten micro-batches stay under
    Dynamo's limit of recompilations per function (hitting it would run the rest of the layer eagerly)."""
    import torch._dynamo.config

    from lcc.runtime.engine import RankEngine

    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    spec = load_spec(SPECS / "tiny-moe.yaml", [*F32, *LAYOUTS["world1"], "train.compile=inductor",
                                               "parallelism.pipeline.microbatches=10", "train.global_batch=10",
                                               "model.n_layers=2"])
    write(compile_plan(spec), tmp_path / "plan")
    engine = RankEngine(tmp_path / "plan", 0)
    first = engine.train_step(0)
    assert first["compile_seconds"] > 0 and engine.train_step(1)["compile_seconds"] == 0
