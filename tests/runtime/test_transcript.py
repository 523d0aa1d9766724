"""What each rank issues in a training step is exactly what its plan says (`lcc run train --transcript`),
in layouts the equivalence runs (which check their transcripts too) do not cover; and its loss is the
reference's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lcc.compiler.cost.model import CostModel
from lcc.compiler.output import write
from lcc.compiler.plan import compile_plan
from lcc.model.trainer import ReferenceTrainer
from lcc.runtime import transcript
from lcc.runtime.launch import launch, read_metrics
from lcc.spec import load_spec
from tests.conftest import SPECS
from tests.runtime.equivalence import LIGHT
from tests.runtime.transcript_oracle import check_rank

CASES = {  # interleaved virtual stages with tp and full recomputation
    "interleaved_tp2_ep2_full": ["parallelism.pp=2", "parallelism.tp=2", "parallelism.dp=1", "parallelism.ep=2",
                                 "cluster.gpus_per_node=4", "parallelism.pipeline.schedule=interleaved_1f1b",
                                 "parallelism.pipeline.virtual_stages=2", "parallelism.activation_checkpointing=full",
                                 "routing.balance.aux_loss_coef=0.01"],
    # sequence parallelism with full recomputation under ZeRO 2
    "sp_zero2_full": ["parallelism.pp=1", "parallelism.tp=2", "parallelism.dp=2", "parallelism.ep=2",
                      "cluster.gpus_per_node=4", "parallelism.sequence_parallel=true", "parallelism.zero=2",
                      "parallelism.activation_checkpointing=full"],
    # ZeRO 2 reduce-scattering every micro-batch (a device memory between the two peaks, `between_peaks`)
    "zero2_microbatch": ["parallelism.pp=1", "parallelism.dp=2", "parallelism.ep=2", "cluster.gpus_per_node=2",
                         "parallelism.zero=2", "parallelism.activation_checkpointing=none"],
    # ZeRO 1 with the experts over an edp axis of one rank: their piece is the whole, used as it is
    "zero1_edp1": ["parallelism.pp=1", "parallelism.dp=2", "parallelism.ep=2", "cluster.gpus_per_node=2",
                   "parallelism.zero=1"],
    # sequence parallelism under bfloat16 autocast: the column-parallel layers keep autocast's copy of their
    # gathered input, so backward gathers nothing again
    "sp_tp2_bfloat16": ["parallelism.tp=2", "parallelism.pp=1", "parallelism.dp=1", "parallelism.ep=1",
                        "cluster.gpus_per_node=2", "parallelism.sequence_parallel=true", "train.dtype=bfloat16"],
    # ZeRO 3 reduce-scattering every micro-batch (by default it is once per step, where memory allows)
    "zero3_microbatch_selective": ["parallelism.pp=2", "parallelism.dp=2", "parallelism.ep=2",
                                   "cluster.gpus_per_node=4", "parallelism.zero=3",
                                   "parallelism.activation_checkpointing=selective"],
}


def between_peaks(overrides: list[str]) -> list[str]:
    """A device memory halfway between the cost model's peaks with gradients reduced every micro-batch and
    once per step (the plan then chooses `microbatch`): the lower of the two fits, the other does not."""
    model = CostModel(load_spec(SPECS / "tiny-moe.yaml", overrides))
    step, each = (max(model.role_memory(r, whole_grads=whole)["peak_bytes"] for r in model.roles)
                  for whole in (True, False))
    assert each < step
    return [f"cluster.device.memory_gib={(step + each) / 2 / 2**30:.6f}"]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES)
def test_step_transcript_equals_plan(case, tmp_path):
    overrides = [*LIGHT, *CASES[case]]
    spec = load_spec(SPECS / "tiny-moe.yaml", overrides + (between_peaks(overrides) if "microbatch" in case else []))
    plan_dir = tmp_path / "plan"
    write(compile_plan(spec), plan_dir)
    path = tmp_path / "transcript.jsonl"
    launch(plan_dir, 1, tmp_path / "metrics.jsonl", quiet=True, transcript=path)
    plan = json.loads((plan_dir / "plan.json").read_text())
    if "microbatch" in case:
        assert plan["memory"]["grad_reduce"] == "microbatch"
    loss = read_metrics(tmp_path / "metrics.jsonl")[0]["loss"]
    tolerance = 1.5e-2 if spec.train.dtype == "bfloat16" else 1e-9  # as tests/runtime/test_bfloat16.py
    assert loss == pytest.approx(ReferenceTrainer(spec).train_step(0)["loss"], rel=tolerance)
    records = transcript.read(path)
    total = sum(check_rank(plan, records, rank) for rank in range(plan["world_size"]))
    assert total > 0
    assert not list(Path(tmp_path).glob("transcript.jsonl.rank*"))  # parts merged
