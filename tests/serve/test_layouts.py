"""Serving under every kind of layout equals the reference model's uncached greedy generation token for
token, and each token's routed experts (return_routed_experts) the reference routers' choices (float64):
tp 2, ep 2 over dp 2, pp 2, and pp 2 x tp 2 x ep 2 from a checkpoint trained under
another layout. Each runs `lcc run generate`'s launcher: one process per rank, gloo on loopback."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from lcc.compiler.output import write
from lcc.compiler.plan import compile_plan
from lcc.plan.codec import read_plan
from lcc.runtime.launch import launch
from lcc.runtime.support import RunError
from lcc.serve.launch import Job, generate
from lcc.serve.sampling import SamplingParams
from lcc.spec import load_spec
from tests.conftest import SPECS, native_cpu_kernels
from tests.serve.plans import PROMPTS, serve_plan, spec_of
from tests.serve.reference import greedy, reference_model
from tests.serve.test_routed_experts import expected

N = 64
TRAIN = ["parallelism.pp=1", "parallelism.dp=1", "parallelism.tp=1", "parallelism.ep=1", "cluster.gpus_per_node=1",
         "parallelism.pipeline.microbatches=1", "train.global_batch=2", "train.seq_len=64"]


def served(plan: Path, tmp_path: Path, checkpoint: Path | None = None, prompts: list[list[int]] = PROMPTS,
           max_num_seqs: int | None = None, routed: bool = False) -> list[list[int]] | list[dict]:
    """The generated token ids per prompt; with `routed`, each prompt's results (token_ids, routed_experts)."""
    out = tmp_path / "out.json"
    params = SamplingParams(max_tokens=N, return_routed_experts=routed)
    generate(plan, Job(prompts, params, str(checkpoint) if checkpoint else None, stream=False, out=str(out),
                       max_num_seqs=max_num_seqs))
    results = json.loads(out.read_text())
    return results if routed else [r["token_ids"] for r in results]


def assert_routed_like_the_reference(model, prompts: list[list[int]], results: list[dict]) -> None:
    """Tokens and each token's experts (return_routed_experts) equal the reference model's."""
    for p, r in zip(prompts, results, strict=True):
        assert r["token_ids"] == greedy(model, p, N), bytes(p)
        assert r["routed_experts"] == expected(model, p, r["token_ids"]), bytes(p)


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
    got = served(serve_plan(plans, layout), tmp_path, prompts=prompts, max_num_seqs=one, routed=True)
    assert_routed_like_the_reference(model, prompts, got)


@pytest.mark.slow
def test_node_limited_routing_over_the_hierarchical_exchange(plans, tmp_path):
    """ep 4 over 2 nodes of 2 ranks; each token's experts in one of 2 sets of groups (a node's); a token goes
    once to each node it needs and is forwarded there: the reference model's tokens with the same routing."""
    sets = ("routing.groups.sets=2", "routing.groups.max_sets=1")
    model = reference_model(spec_of("world1", sets))
    got = served(serve_plan(plans, "nodes2_ep4_dp4", (*sets, "parallelism.expert_exchange=hierarchical")), tmp_path)
    for p, tokens in zip(PROMPTS, got, strict=True):
        assert tokens == greedy(model, p, N, key=("tiny-init", *sets)), bytes(p)


@pytest.mark.slow
def test_virtual_stages_and_a_tied_head(plans, tmp_path):
    """Interleaved stages (pipeline rank 0 runs stages 0 and 2, rank 1 stages 1 and 3) and the LM head tied
    to the embedding, on the last stage."""
    extra = ("parallelism.pipeline.schedule=interleaved_1f1b", "parallelism.pipeline.virtual_stages=2",
             "model.tie_embeddings=true")
    model = reference_model(spec_of("pp2", extra))
    got = served(serve_plan(plans, "pp2", extra), tmp_path, prompts=PROMPTS[:2], routed=True)
    assert_routed_like_the_reference(model, PROMPTS[:2], got)


@pytest.mark.slow
def test_generation_from_a_checkpoint_of_another_layout(plans, tmp_path):
    """Trained 2 steps at world 1 (float32), served at pp 2 x tp 2 x ep 2 (float64): equal to the reference
    model loaded from the same checkpoint."""
    train_plan = tmp_path / "train"
    write(compile_plan(load_spec(SPECS / "tiny-moe.yaml", TRAIN)), train_plan)
    launch(train_plan, 2, quiet=True, checkpoints=tmp_path / "ckpt")
    checkpoint = tmp_path / "ckpt" / "step-000002"
    model = reference_model(spec_of("world1"), checkpoint)
    got = served(serve_plan(plans, "pp2_tp2_ep2"), tmp_path, tmp_path / "ckpt", routed=True)
    assert_routed_like_the_reference(model, PROMPTS, got)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_failing_rank_0_ends_the_run_with_its_own_error(plans, tmp_path):
    """Rank 0 fails inside a step, while rank 1 waits for its activations: the run ends at once, named by
    rank 0's error (not after the collective timeout, nor by its peer's fallout)."""
    folder = tmp_path / "plan"
    shutil.copytree(serve_plan(plans, "pp2", ("train.collective_timeout_s=60",)), folder)
    program = folder / "programs" / "stage0.py"
    program.write_text(program.read_text().replace('    """P: this', '    raise RuntimeError("boom in stage 0")\n'
                                                   '    """P: this', 1))
    start = time.monotonic()
    with pytest.raises(RunError) as err:
        served(folder, tmp_path)
    assert time.monotonic() - start < 30
    assert str(err.value).startswith("rank 0 failed: RuntimeError: boom in stage 0"), str(err.value)


@pytest.mark.slow
@pytest.mark.skipif(native_cpu_kernels() is not None, reason="lcc's native CPU kernels cannot run here")
def test_native_cpu_kernels_across_ranks(plans, tmp_path):
    """lcc's native CPU kernels (int4 experts, attention, routing) in ranks started by the launcher, across
    pp 2 x tp 2 x ep 2: in float32 the greedy tokens are those of PyTorch's kernels in the same layout."""
    f32 = ("serve.dtype=float32",)
    native = serve_plan(plans, "pp2_tp2_ep2", f32)
    assert read_plan(native).serving.routing_kernel == "native_cpu"
    got = served(native, tmp_path, prompts=PROMPTS[:2])
    want = served(serve_plan(plans, "pp2_tp2_ep2", (*f32, "serve.cpu_kernels=torch")), tmp_path, prompts=PROMPTS[:2])
    assert got == want
