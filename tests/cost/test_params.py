from __future__ import annotations

import pytest

from lcc.compiler.cost import params as P
from lcc.spec import load_spec
from tests.conftest import SPECS, write

DENSE = """
name: dense
model:
  vocab_size: 100
  d_model: 16
  n_layers: 2
  max_seq_len: 32
  attention: {n_heads: 4, n_kv_heads: 2, head_dim: 4}
  ffn: {d_ff: 32}
cluster:
  gpus_per_node: 1
  device: {memory_gib: 1, peak_tflops: 1, memory_tbps: 1}
  network: {intra_node_gbps: 1, inter_node_gbps: 1}
train: {seq_len: 16, global_batch: 2, data: {kind: synthetic}}
"""

MOE = DENSE.replace("  ffn: {d_ff: 32}\n", """  ffn: {d_ff: 32}
  moe: {layers: [1], n_experts: 8, n_groups: 2, expert_d_ff: 8, n_shared_experts: 1}
routing:
  groups: {top: 1}
  k: {min: 1, max: 2}
""").replace("name: dense", "name: moe")


def test_dense_counts_by_hand(tmp_path):
    spec = load_spec(write(tmp_path, DENSE))
    # embedding 100*16; head 100*16 + final norm 16; per layer q,o 16*16 each, k,v 16*8 each, norms 2*16,
    # SwiGLU 3*16*32
    per_layer = 2 * 256 + 2 * 128 + 32 + 1536
    assert P.layer_params(spec, 0).total == per_layer == 2336
    assert P.total_params(spec) == 1600 + 1616 + 2 * 2336 == 7888
    assert P.active_params(spec, 1) == 7888  # a dense model reads every parameter


def test_moe_counts_by_hand(tmp_path):
    spec = load_spec(write(tmp_path, MOE))
    moe_layer = P.layer_params(spec, 1)
    assert (moe_layer.router, moe_layer.shared, moe_layer.experts) == ((2 + 8) * 16, 3 * 16 * 8, 8 * 384)
    assert P.total_params(spec) == 1600 + 1616 + 2336 + (768 + 32 + 160 + 384 + 3072) == 9968
    # a token reads: everything but the 8 routed experts and the 8 router rows, plus k experts and the
    # router rows of its one kept group of 4 experts
    assert P.active_params(spec, 1) == 9968 - 3072 - 128 + 384 + 4 * 16 == 7216
    assert P.active_params(spec, 2) == 7216 + 384


def test_tied_embeddings_count_once(tmp_path):
    tied = DENSE.replace("  max_seq_len: 32\n", "  max_seq_len: 32\n  tie_embeddings: true\n")
    spec = load_spec(write(tmp_path, tied))
    assert P.total_params(spec) == 7888 - 1600


def test_local_params_split_by_tp_and_ep():
    spec = load_spec(SPECS / "tiny-moe.yaml", ["parallelism.tp=2", "parallelism.dp=2"])
    dense, experts = P.local_layer_params(spec, 0)
    full = P.layer_params(spec, 0)
    assert experts == full.experts // 4
    # q and o split over tp; one kv head of 2 per rank; norms and router replicated
    assert dense == 2 * 128 * 128 // 2 + 2 * 128 * 32 + full.norms + full.router


def test_longcat_is_16t_within_3_percent():
    spec = load_spec(SPECS / "longcat-2.0.yaml")
    assert P.total_params(spec) == pytest.approx(1.6e12, rel=0.03)
