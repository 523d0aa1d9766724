from __future__ import annotations

import pytest
import torch

from lcc.compiler.plan import compile_plan
from lcc.model import build_model
from lcc.spec import load_spec
from tests.compiler.programs import run_pipeline
from tests.conftest import SPECS

ONE_RANK_PER_STAGE = {
    "world1": ["parallelism.pp=1", "parallelism.dp=1", "parallelism.ep=1", "cluster.gpus_per_node=1",
               "parallelism.pipeline.microbatches=1"],
    "pp2": ["parallelism.pp=2", "parallelism.dp=1", "parallelism.ep=1", "cluster.gpus_per_node=2"],
    "interleaved": ["parallelism.pp=2", "parallelism.dp=1", "parallelism.ep=1", "cluster.gpus_per_node=2",
                    "parallelism.pipeline.schedule=interleaved_1f1b", "parallelism.pipeline.virtual_stages=2"],
}


MEMORY = {"plain": [], "selective": ["parallelism.activation_checkpointing=selective"],
          "zero3_full": ["parallelism.zero=3", "parallelism.activation_checkpointing=full"]}


MEMORY["tied"] = ["model.tie_embeddings=true"]  # the head uses the embedding: on one stage, or a copy on the last

CASES = [(layout, "tiny-moe", memory) for layout in ONE_RANK_PER_STAGE for memory in MEMORY if memory != "tied"]
CASES += [("world1", "tiny-moe", "tied"), ("pp2", "tiny-moe", "tied")]


@pytest.mark.parametrize(("layout", "spec_name", "memory"), CASES)
def test_programs_compute_the_reference_forward_and_backward(layout, spec_name, memory):
    """Bitwise, including recomputation in backward; every router call is recorded once."""
    overrides = list(ONE_RANK_PER_STAGE[layout]) + MEMORY[memory]
    spec = load_spec(SPECS / f"{spec_name}.yaml", [*overrides, "train.dtype=float64"])
    files = compile_plan(spec)
    model = build_model(spec)
    tokens = torch.randint(0, spec.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    params = dict(model.named_parameters())
    if spec.parallelism.zero >= 3:  # one rank per ZeRO group: a rank's piece is the whole flattened tensor
        params = {n: p.reshape(-1) for n, p in params.items()}
    logits, ctx = run_pipeline(files, model, spec, tokens, params=params)
    reference = model(tokens)
    assert torch.equal(logits, reference)
    grads = torch.autograd.grad(logits.square().sum(), list(model.parameters()), allow_unused=True)
    model.zero_grad()
    reference_grads = torch.autograd.grad(model(tokens).square().sum(), list(model.parameters()), allow_unused=True)
    for a, b in zip(grads, reference_grads, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert {site: len(routes) for site, routes in ctx.routes.items()} == {f"layers.{i}.ffn": 1
                                                                          for i in spec.model.moe_layers}


def test_program_shows_every_collective():
    spec = load_spec(SPECS / "tiny-moe.yaml", ["parallelism.tp=2", "parallelism.dp=2"])
    text = compile_plan(spec)["programs/stage0.py"]
    for line in ("ops.all_reduce(embed, G.tp)", "ops.copy_to_tp(", "ops.split_tokens(", "ops.all_to_all(",
                 "ops.gather_tokens(", "ops.all_reduce(layers_0_attn_wo, G.tp)"):
        assert line in text
    compile(text, "stage0.py", "exec")  # valid Python
