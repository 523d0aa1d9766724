from __future__ import annotations

import pytest
import torch

from lcc.data.corpus import builtin_corpus
from lcc.data.stream import TokenStream, step_units
from lcc.model.quantized import Int4ExpertFFN, quantize_experts
from lcc.model.trainer import ReferenceTrainer, lr_at
from lcc.spec import load_spec
from tests.conftest import SPECS

SMALL = ["train.global_batch=8", "parallelism.pipeline.microbatches=2", "parallelism.dp=4",
         "train.seq_len=32", "train.steps=12", "train.optimizer.warmup_steps=2"]


def test_builtin_corpus_is_fixed_text():
    a = builtin_corpus()
    assert a == builtin_corpus() and len(a) == 1 << 20
    assert a.isascii() and b" plus " in a


def test_data_order_units():
    spec = load_spec(SPECS / "tiny-moe.yaml")
    stream = TokenStream(torch.arange(100_000), spec.train.seq_len)
    units = step_units(stream, spec, step=3)
    assert len(units) == spec.parallelism.dp * spec.parallelism.pipeline.microbatches
    first = 3 * spec.train.global_batch * spec.train.seq_len
    assert units[0][0, 0] == first and units[0].shape == (2, spec.train.seq_len + 1)
    assert units[1][0, 0] == first + 2 * spec.train.seq_len  # units follow each other in the stream


def test_lr_schedule():
    spec = load_spec(SPECS / "tiny-moe.yaml")
    opt = spec.train.optimizer
    assert lr_at(spec, 0) == pytest.approx(opt.lr / opt.warmup_steps)
    assert lr_at(spec, opt.warmup_steps - 1) == pytest.approx(opt.lr)
    assert lr_at(spec, spec.train.steps) == pytest.approx(opt.lr * opt.min_lr_ratio)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_training_lowers_the_loss(dtype):
    spec = load_spec(SPECS / "tiny-moe.yaml", [*SMALL, f"train.dtype={dtype}"])
    trainer = ReferenceTrainer(spec)
    first = trainer.train_step(0)
    for step in range(1, 12):
        last = trainer.train_step(step)
    assert last["loss"] < first["loss"] - 0.5
    router = last["router"][0]
    assert sum(router["k_histogram"]) == router["tokens"] == 8 * 32
    assert sum(router["load_per_expert"]) == pytest.approx(router["experts_per_token"] * router["tokens"])


def test_bias_moves_toward_idle_experts():
    spec = load_spec(SPECS / "tiny-moe.yaml", SMALL)
    trainer = ReferenceTrainer(spec)
    stats = trainer.train_step(0)["router"][0]
    load = torch.tensor(stats["load_per_expert"])
    bias = trainer.model.layers[0].ffn.router.bias_E
    assert (bias[load < load.mean()] > 0).all() and (bias[load > load.mean()] < 0).all()


def test_int4_model_runs_and_is_close():
    spec = load_spec(SPECS / "tiny-moe.yaml", SMALL)
    trainer = ReferenceTrainer(spec)
    for step in range(4):
        trainer.train_step(step)
    before = trainer.evaluate(16)
    packed = quantize_experts(trainer.model, spec.quantization.experts)
    assert isinstance(trainer.model.layers[0].ffn.experts, Int4ExpertFFN)
    dense_bytes = 4 * 3 * 64 * 128 * 64 * 2  # layers x matrices x experts x d_model x d_ff x bf16
    assert packed == pytest.approx(dense_bytes * (4 + 16 / 32) / 16)
    assert abs(trainer.evaluate(16) - before) < 0.05 * before


def test_text_and_synthetic_data(tmp_path):
    from lcc.data.stream import corpus_tokens

    (tmp_path / "corpus.txt").write_bytes(b"hello world " * 100)
    spec = load_spec(SPECS / "tiny-moe.yaml", ["train.data.kind=text", "train.data.path=corpus.txt"])
    tokens = corpus_tokens(spec, spec_dir=tmp_path)
    assert bytes(tokens[:11].tolist()) == b"hello world"
    spec = load_spec(SPECS / "tiny-moe.yaml", ["train.data.kind=synthetic"])
    a, b = corpus_tokens(spec), corpus_tokens(spec)
    assert torch.equal(a, b) and int(a.max()) < spec.model.vocab_size


def test_too_short_corpus_is_an_error(tmp_path):
    (tmp_path / "c.txt").write_bytes(b"short")
    with pytest.raises(ValueError, match="fewer than one sequence"):
        TokenStream(torch.arange(5), 128)
