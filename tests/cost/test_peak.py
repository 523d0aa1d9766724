"""The peak of one rank over a step (lcc.compiler.cost.peak) on hand-computed cases, the activations of the
layer shape the generated programs run, and serving's KV cache and workspace."""

from __future__ import annotations

import pytest

from lcc.compiler.cost.memory import LayerShape, MoEShape, dense_layer_activations, moe_activations
from lcc.compiler.cost.model import CostModel
from lcc.compiler.cost.peak import Backward, Block, gather_updated, walk
from lcc.compiler.cost.report import cost_report
from lcc.compiler.cost.traffic import BUCKET_ELEMENTS
from lcc.spec import load_spec
from tests.conftest import SPECS


def _block(name, kept, grads, elements=(0, 0), rebuilt=0.0, after=0.0, regathered=0.0, end=True):
    return Block(name, kept, rebuilt, after, grads, regathered, elements, end)


def _walk(b, blocks):
    return walk(b, [(-1, x) for x in blocks])


def _backward(zero=0, ways=(1, 1), accumulate=False, pieces_accumulate=False, carried=0.0, others=0.0):
    return Backward(100.0, carried, others, zero, accumulate, pieces_accumulate, 1, ways)


def test_activations_peak_at_the_end_of_forward():
    # two layers keeping 50 each, making 10 of gradients each: 100 + 100 held when backward starts
    peak, where, grads = _walk(_backward(), [_block("b", 50, 10), _block("a", 50, 10)])
    assert (peak, where, grads) == (200, "end of forward", 20)


def test_gradients_peak_at_the_end_of_backward():
    # 10 kept, 80 of gradients: the last block's end holds every gradient and nothing kept
    peak, where, grads = _walk(_backward(), [_block("b", 5, 80), _block("a", 5, 80)])
    assert (peak, where, grads) == (100 + 160, "backward of a (end)", 160)


def test_recomputation_rebuilds_a_layer_at_its_start():
    blocks = [_block("mlp", 0, 0, rebuilt=30, after=12), _block("attention", 2, 0, rebuilt=12)]
    peak, where, _ = _walk(_backward(), blocks)
    assert (peak, where) == (100 + 2 + 30, "backward of mlp (start)")


def test_buckets_close_at_bucket_elements_and_after_backward():
    half = BUCKET_ELEMENTS // 2
    b = _backward(zero=1, ways=(4, 2))
    blocks = [_block("c", 0, 2 * half, (half, half)), _block("b", 0, half, (half, 0)), _block("a", 0, 2, (2, 0))]
    # dense: half + half closes at b, flattened beside its gradients; experts: half, and the dense 2, stay
    # open until after backward
    peak, where, grads = _walk(b, blocks)
    assert (peak, where) == (100 + 3 * half + 2 * half, "backward of b (end)")
    assert grads == 3 * half + 2
    peak, where, _ = _walk(b, [*blocks, _block("z", 0, 3 * half)])
    assert (peak, where) == (100 + 6 * half + 2 + half + 2, "gradient reduction")


def test_zero2_bucket_is_laid_out_then_leaves_as_pieces():
    n = BUCKET_ELEMENTS
    b = _backward(zero=2, ways=(4, 1))
    peak, where, grads = _walk(b, [_block("a", 0, n, (n, 0))])
    # the whole gradients, their grid and the reduce-scatter's output (this rank's pieces)
    assert (peak, where) == (100 + 2 * n + n // 4, "backward of a (end)")
    assert grads == n // 4


def test_zero3_regathers_and_reduce_scatters_each_layer():
    b = _backward(zero=3, ways=(2, 2))
    blocks = [_block("mlp", 40, 8, (8, 0), regathered=30, end=False), _block("attention", 40, 8, (8, 0))]
    peak, where, grads = _walk(b, blocks)
    assert (peak, where) == (100 + 80 + 30, "backward of mlp (start)")
    assert grads == 8  # the layer's 16 elements of gradients, half of them on this rank


def test_accumulated_gradients_are_carried():
    # a second micro-batch: its gradients are added in place to the 40 held whole
    b = _backward(accumulate=True, carried=40)
    peak, _, grads = _walk(b, [_block("a", 50, 40)])
    assert peak == 100 + 50 + 40 and grads == 40


def test_runtime_layer_shape():
    x = LayerShape(seq=8, batch=2, d_model=16, n_heads=4, q_local=16, kv_local=8, ffn_local=32,
                   scores_stored=False, act_bytes=4, norm_keeps_normalised=True, kernel_keeps_output=True)
    # per block outside: input, normalised, norm output (3 h); inside: q, k, v, output projection input,
    # the kernel's output (q) and float32 log-sum-exp per head; SwiGLU 4 f
    per_token = 4 * (6 * 16 + 2 * 16 + 2 * 8 + 16 + 4 * 32) + 4 * 4
    assert dense_layer_activations(x) == 16 * per_token
    assert dense_layer_activations(x, "selective") == 16 * (per_token - 4 * 16 - 4 * 4)
    assert dense_layer_activations(x, "full") == 16 * 16 * 4


def test_moe_activations():
    x = MoEShape(tokens=10, d_model=8, expert_d_ff=4, k_slots=2, n_groups=4, kept_logits=6, tp=1, act_bytes=2,
                 router_bytes=4, top_groups=2)
    slots = 20
    kept = slots * 2 * (8 + 4 * 4 + 2 * 8)  # dispatched rows, SwiGLU, outputs and their gated copy
    router = 10 * 4 * ((1 + 2 + 1) * 8 + 4 + 2 * 6)  # normalised, per kept group, float32 copy; small ones
    assert moe_activations(x) == kept + router
    assert moe_activations(x, "selective") == kept
    assert moe_activations(x, "full") == 0


def test_zero1_gathers_the_updated_experts_into_a_buffer_beside_the_parameters():
    # small-moe as shipped: dp 4, ep 2, so the experts are sharded over edp 2 and the dense parameters over
    # dp 4; the experts' gather is the larger: its buffer (every rank's pieces, whole) beside the states
    spec = load_spec(SPECS / "small-moe.yaml", ["parallelism.zero=1", "parallelism.activation_checkpointing=full"])
    cm = CostModel(spec)
    (role,) = cm.roles
    m = cm.role_memory(role)
    local = cm.local(role)
    pieces = 4 * (-(-local.dense // 4) + -(-local.experts // 2))
    assert gather_updated(cm, role, local) == 4 * local.experts
    assert m["peak_bytes"] >= m["weights_bytes"] + m["optimizer_bytes"] + pieces + 4 * local.experts


def test_full_checkpointing_lowers_the_peak_less_than_the_activations():
    def worst(*overrides):
        return cost_report(load_spec(SPECS / "small-moe.yaml", list(overrides)))["memory"]["worst_rank"]

    none, full = worst(), worst("parallelism.activation_checkpointing=full")
    assert full["activations_bytes"] < none["activations_bytes"] / 5
    assert none["peak_phase"] == "end of forward" and full["peak_bytes"] > none["peak_bytes"] / 2


def test_serve_memory():
    spec = load_spec(SPECS / "small-moe.yaml", ["serve.kv_blocks=100"])
    serve = cost_report(spec)["serve"]
    (role,) = serve["by_role"]
    assert role["kv_cache_bytes"] == 100 * 16 * role["kv_bytes_per_token"]  # what the rank allocates
    assert role["workspace_bytes"] > 0
    assert role["total_bytes"] == pytest.approx(role["weights_bytes"] + role["kv_cache_bytes"]
                                                + role["workspace_bytes"])
    assert serve["worst_rank_bytes"] == role["total_bytes"]


@pytest.mark.parametrize("policy, lower", [("none", True), ("full", False)])
def test_gradients_reduced_every_microbatch_only_where_that_lowers_the_peak(policy, lower):
    # tiny-moe's gradients are one bucket per group: every micro-batch's backward holds them whole until it
    # ends, beside the pieces of earlier micro-batches. Only the activations the step mode holds beside its
    # carried gradients (none kept under full recomputation) can make reducing every micro-batch pay.
    base = ["parallelism.pp=1", "parallelism.dp=2", "parallelism.ep=2", "cluster.gpus_per_node=2",
            "parallelism.zero=2", "parallelism.pipeline.microbatches=2",
            f"parallelism.activation_checkpointing={policy}"]
    model = CostModel(load_spec(SPECS / "tiny-moe.yaml", base))
    step, each = (max(model.role_memory(r, whole_grads=whole)["peak_bytes"] for r in model.roles)
                  for whole in (True, False))
    assert (each < step) is lower
    below = load_spec(SPECS / "tiny-moe.yaml", [*base, f"cluster.device.memory_gib={min(step, each) / 2**30 * 0.999}"])
    assert CostModel(below).grad_reduce_when == ("microbatch" if lower else "step")
    roomy = load_spec(SPECS / "tiny-moe.yaml", [*base, f"cluster.device.memory_gib={step / 2**30 * 1.001}"])
    assert CostModel(roomy).grad_reduce_when == "step"
