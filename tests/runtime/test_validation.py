"""Validation (`train.eval_every`): the loss on the held-out tokens, in the step's metrics on every rank's
agreement, equals the reference model's cross-entropy on those tokens with the step's weights (float64), and
is the same under other layouts; a corpus too short to validate on is refused before any rank starts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lcc.compiler.output import write
from lcc.compiler.plan import compile_plan
from lcc.data.corpus import builtin_corpus
from lcc.model import build_model
from lcc.plan import read_plan
from lcc.runtime.launch import launch, read_metrics
from lcc.runtime.support import RunError
from lcc.spec import load_spec
from tests.conftest import SPECS
from tests.runtime.equivalence import SMALL
from tests.serve.reference import load_checkpoint

WORLD1 = ["parallelism.pp=1", "parallelism.dp=1", "parallelism.tp=1", "parallelism.ep=1", "cluster.gpus_per_node=1",
          "parallelism.pipeline.microbatches=1"]
OTHERS = {  # 4 ranks each, the same 4 units a step
    "pp2_tp2": ["parallelism.pp=2", "parallelism.dp=1", "parallelism.tp=2", "parallelism.ep=1",
                "parallelism.pipeline.microbatches=4", "cluster.gpus_per_node=4"],
    "dp2_ep2_tp2_zero3": ["parallelism.pp=1", "parallelism.dp=2", "parallelism.tp=2", "parallelism.ep=2",
                          "parallelism.zero=3", "parallelism.pipeline.microbatches=2", "cluster.gpus_per_node=4"],
}
EVAL = ["train.eval_every=2", "train.eval_batches=2"]


def held_out_loss(spec, checkpoint) -> float:
    """The reference model with the checkpoint's weights on the first eval_batches global batches of the
    corpus's last 5%, cut into sequences of seq_len + 1 tokens, one after another (docs/model.md)."""
    model = load_checkpoint(build_model(spec, dtype=torch.float64), checkpoint)
    corpus = list(builtin_corpus())
    held = torch.tensor(corpus[int(len(corpus) * 0.95):])
    L, n = spec.train.seq_len, spec.train.eval_batches * spec.train.global_batch
    seqs = torch.stack([held[i * L:i * L + L + 1] for i in range(n)])
    with torch.no_grad():
        logits = model(seqs[:, :-1])
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, 1:].reshape(-1),
                                 reduction="sum")) / (n * L)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_validation_loss_equals_the_reference_on_the_held_out_tokens_under_every_layout(tmp_path):
    spec = load_spec(SPECS / "tiny-moe.yaml", [*SMALL, *WORLD1, *EVAL])
    write(compile_plan(spec), tmp_path / "world1")
    assert read_plan(tmp_path / "world1").data.validation.every == 2
    launch(tmp_path / "world1", 4, tmp_path / "world1.jsonl", quiet=True, checkpoints=tmp_path / "ckpt")
    records = read_metrics(tmp_path / "world1.jsonl")
    assert [("val_loss" in r) for r in records] == [False, True, False, True]
    want = held_out_loss(spec, tmp_path / "ckpt" / "step-000004")
    assert records[3]["val_loss"] == pytest.approx(want, rel=1e-10, abs=0)
    assert records[3]["val_perplexity"] == pytest.approx(math.exp(want), rel=1e-10)
    assert records[1]["val_loss"] != records[3]["val_loss"]  # the weights changed, the batches did not
    for name, layout in OTHERS.items():
        write(compile_plan(load_spec(SPECS / "tiny-moe.yaml", [*SMALL, *layout, *EVAL])), tmp_path / name)
        launch(tmp_path / name, 4, tmp_path / f"{name}.jsonl", quiet=True)
        theirs = read_metrics(tmp_path / f"{name}.jsonl")
        for mine, other in zip(records, theirs, strict=True):
            assert ("val_loss" in other) == ("val_loss" in mine)
            if "val_loss" in mine:
                assert other["val_loss"] == pytest.approx(mine["val_loss"], rel=1e-8, abs=0), name


def test_a_corpus_too_short_to_validate_on_is_refused_before_any_rank_starts(tmp_path):
    (tmp_path / "short.txt").write_text("x" * 700)  # 35 tokens held out: fewer than a sequence of 65
    spec = load_spec(SPECS / "tiny-moe.yaml", [*WORLD1, "train.seq_len=64", "train.global_batch=2",
                                               "train.data.kind=text", f"train.data.path={tmp_path / 'short.txt'}",
                                               "train.eval_every=1"])
    write(compile_plan(spec), tmp_path / "plan")
    with pytest.raises(RunError) as err:
        launch(tmp_path / "plan", 1, quiet=True)
    assert "train.eval_every:" in str(err.value) and "holds out 35 tokens" in str(err.value), str(err.value)
    # train.data.held_out: a fifth of it held out (140 tokens) holds two validation sequences
    write(compile_plan(load_spec(SPECS / "tiny-moe.yaml", [*WORLD1, "train.seq_len=64", "train.global_batch=2",
                                                           "train.data.kind=text", "train.data.held_out=0.2",
                                                           f"train.data.path={tmp_path / 'short.txt'}",
                                                           "train.eval_every=1"])), tmp_path / "fifth")
    launch(tmp_path / "fifth", 1, tmp_path / "m.jsonl", quiet=True)
    assert "val_loss" in read_metrics(tmp_path / "m.jsonl")[0]
