"""Serving under every kind of layout equals the reference model's uncached greedy generation token for
token (float64): tp 2, ep 2 over dp 2, pp 2, and pp 2 x tp 2 x ep 2 from a checkpoint trained under
another layout. Each runs `lcc run generate`'s launcher: one process per rank, gloo on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lcc.compiler.output import write
from lcc.compiler.plan import compile_plan
from lcc.runtime.launch import launch
from lcc.serve.launch import Job, generate
from lcc.serve.sampling import SamplingParams
from lcc.spec import load_spec
from tests.conftest import SPECS
from tests.serve.plans import PROMPTS, serve_plan, spec_of
from tests.serve.reference import greedy, reference_model

N = 64
TRAIN = ["parallelism.pp=1", "parallelism.dp=1", "parallelism.tp=1", "parallelism.ep=1", "cluster.gpus_per_node=1",
         "parallelism.pipeline.microbatches=1", "train.global_batch=2", "train.seq_len=64"]


def served(plan: Path, tmp_path: Path, checkpoint: Path | None = None, prompts: list[list[int]] = PROMPTS,
           max_num_seqs: int | None = None) -> list[list[int]]:
    out = tmp_path / "out.json"
    generate(plan, Job(prompts, SamplingParams(max_tokens=N), str(checkpoint) if checkpoint else None, stream=False,
                       out=str(out), max_num_seqs=max_num_seqs))
    return [r["token_ids"] for r in json.loads(out.read_text())]


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-layouts")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "ep2_dp2", "pp2"])
def test_layout_generates_the_reference_tokens(plans, tmp_path, layout):
    model = reference_model(spec_of("world1"))
    prompts, one = PROMPTS, None
    if layout == "ep2_dp2":  # one sequence at a time per dp rank: dp rank 1 has one, then idles 64 steps while
        prompts, one = PROMPTS[:3], 1  # dp rank 0 serves its second (its ranks still join the all-to-alls)
    got = served(serve_plan(plans, layout), tmp_path, prompts=prompts, max_num_seqs=one)
    for p, tokens in zip(prompts, got, strict=True):
        assert tokens == greedy(model, p, N, key=("tiny-init",)), bytes(p)


@pytest.mark.slow
def test_generation_from_a_checkpoint_of_another_layout(plans, tmp_path):
    """Trained 2 steps at world 1 (float32), served at pp 2 x tp 2 x ep 2 (float64): equal to the reference
    model loaded from the same checkpoint."""
    train_plan = tmp_path / "train"
    write(compile_plan(load_spec(SPECS / "tiny-moe.yaml", TRAIN)), train_plan)
    launch(train_plan, 2, quiet=True, checkpoints=tmp_path / "ckpt")
    checkpoint = tmp_path / "ckpt" / "step-000002"
    model = reference_model(spec_of("world1"), checkpoint)
    got = served(serve_plan(plans, "pp2_tp2_ep2"), tmp_path, tmp_path / "ckpt")
    for p, tokens in zip(PROMPTS, got, strict=True):
        assert tokens == greedy(model, p, N), bytes(p)
