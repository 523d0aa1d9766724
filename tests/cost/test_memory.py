"""Model-state memory against the ZeRO paper, activations against Korthikanti et al. (2022)."""

from __future__ import annotations

import pytest

from lcc.compiler.cost.memory import LayerShape, dense_layer_activations, model_states


@pytest.mark.parametrize(("zero", "gb"), [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_figure_1(zero, gb):
    # Rajbhandari et al. 2020, Figure 1: 7.5B parameters, N_d = 64, mixed precision Adam (K = 12)
    states = model_states(7_500_000_000, "bfloat16", zero, 64)
    assert states.total / 1e9 == pytest.approx(gb, abs=0.06)


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_zero_formula_per_stage(zero):
    psi, n = 1000, 8
    s = model_states(psi, "float32", zero, n)
    assert s.weights == 4 * (psi / n if zero >= 3 else psi)
    assert s.grads == 4 * (psi / n if zero >= 2 else psi)
    assert s.optimizer == 8 * (psi / n if zero >= 1 else psi)


def test_uneven_shards_round_up():
    assert model_states(10, "float32", 3, 4).weights == 4 * 3


def _gpt(s, b, h, a, t=1, sp=False):
    return LayerShape(seq=s, batch=b, d_model=h, n_heads=a, q_local=h / t, kv_local=h / t, ffn_local=4 * h / t,
                      mlp="gelu", dropout=True, scores_stored=True, tp=t, sequence_parallel=sp, act_bytes=2)


SHAPES = [(2048, 1, 12288, 96, 8), (2048, 4, 4096, 32, 4), (512, 8, 1024, 16, 2)]


@pytest.mark.parametrize(("s", "b", "h", "a", "t"), SHAPES)
def test_korthikanti_no_parallelism(s, b, h, a, t):
    assert dense_layer_activations(_gpt(s, b, h, a)) == pytest.approx(s * b * h * (34 + 5 * a * s / h))


@pytest.mark.parametrize(("s", "b", "h", "a", "t"), SHAPES)
def test_korthikanti_tensor_parallel(s, b, h, a, t):
    expected = s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    assert dense_layer_activations(_gpt(s, b, h, a, t)) == pytest.approx(expected)


@pytest.mark.parametrize(("s", "b", "h", "a", "t"), SHAPES)
def test_korthikanti_sequence_parallel_and_recompute(s, b, h, a, t):
    x = _gpt(s, b, h, a, t, sp=True)
    assert dense_layer_activations(x) == pytest.approx(s * b * h / t * (34 + 5 * a * s / h))
    assert dense_layer_activations(x, "selective") == pytest.approx(s * b * h / t * 34)
    assert dense_layer_activations(x, "full") == pytest.approx(2 * s * b * h / t)


def test_swiglu_without_dropout_or_scores():
    x = LayerShape(seq=8, batch=2, d_model=16, n_heads=4, q_local=16, kv_local=8, ffn_local=32,
                   scores_stored=False, act_bytes=4)
    # norms' inputs, QKV and FFN inputs: 4 x h; q, k, v, attention output; w1, w3, silu, product: 4 x f
    assert dense_layer_activations(x) == 16 * 4 * (4 * 16 + 16 + 8 + 8 + 16 + 4 * 32)
