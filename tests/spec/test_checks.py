"""One test per cross-field rule: the first problem names the field, the right line, and the other fields."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from lcc.spec import SpecError, load_spec
from tests.conftest import line_of, write


@dataclass
class Case:
    name: str
    edits: list[tuple[str, str]]  # text replacements in tiny-moe.yaml
    path: str  # dotted path the first problem must name
    line_needle: str  # text on the line the problem must point at (in the edited file)
    mentions: list[str]  # substrings the message or its related fields must contain
    overrides: tuple[str, ...] = ()


CASES = [
    Case("experts_by_groups", [("n_groups: 8 ", "n_groups: 7 ")], "model.moe.n_experts", "n_experts: 64",
         ["not divisible by n_groups 7", "model.moe.n_groups", "try n_groups"]),
    Case("groups_top", [("top: 2 ", "top: 9 ")], "routing.groups.top", "top: 9", ["model.moe.n_groups"]),
    Case("k_min_le_max", [("{min: 1, max: 4, threshold: 0.5, expected: 2.0}", "{min: 3, max: 2, threshold: 0.5}")],
         "routing.k.min", "k: {min: 3", ["routing.k.max"]),
    Case("k_expected_in_range", [("expected: 2.0}", "expected: 5.0}")], "routing.k.expected", "expected: 5.0",
         ["routing.k.min", "routing.k.max"]),
    Case("k_max_reachable", [("max: 4, threshold", "max: 17, threshold")], "routing.k.max", "max: 17",
         ["16 experts reachable", "routing.groups.top"]),
    Case("heads_by_kv", [("n_kv_heads: 2 ", "n_kv_heads: 3 ")], "model.attention.n_heads", "n_heads: 4",
         ["model.attention.n_kv_heads"]),
    Case("heads_by_tp", [], "model.attention.n_heads", "n_heads: 4", ["parallelism.tp"],
         ("parallelism.tp=8", "parallelism.dp=1", "parallelism.pp=1", "parallelism.pipeline.microbatches=1")),
    Case("kv_heads_by_tp", [("n_heads: 4", "n_heads: 6"), ("n_kv_heads: 2 ", "n_kv_heads: 3 ")],
         "model.attention.n_kv_heads", "n_kv_heads: 3", ["parallelism.tp"],
         ("parallelism.tp=2", "parallelism.dp=2")),
    Case("vocab_by_tp", [("vocab_size: 256", "vocab_size: 255")], "model.vocab_size", "vocab_size: 255",
         ["parallelism.tp", "pad vocab_size to 256"], ("parallelism.tp=2", "parallelism.dp=2")),
    Case("world_size", [("  dp: 4\n", "  dp: 3\n")], "parallelism.dp", "dp: 3",
         ["cluster.nodes", "cluster.gpus_per_node", "set dp 4"]),
    Case("tp_in_node",
         [("gpus_per_node: 8 ", "gpus_per_node: 6 "), ("nodes: 1", "nodes: 2"), ("  tp: 1\n", "  tp: 4\n")],
         "parallelism.tp", "tp: 4", ["does not divide gpus_per_node 6", "would span nodes", "cluster.gpus_per_node"],
         ("parallelism.pp=1", "parallelism.dp=3", "parallelism.pipeline.microbatches=1", "train.global_batch=36")),
    Case("d_model_by_tp", [("d_model: 128", "d_model: 130"), ("group_size: 32", "group_size: 2")], "model.d_model",
         "d_model: 130", ["not divisible by tp 4", "parallelism.tp"],
         ("parallelism.tp=4", "parallelism.dp=1", "parallelism.pipeline.microbatches=1", "train.global_batch=4")),
    Case("ep_divides_folded", [("ep: 4 ", "ep: 8 ")], "parallelism.ep", "ep: 8",
         ["does not divide dp*tp = 4", "parallelism.dp"]),
    Case("ep_divides_experts", [("n_experts: 64", "n_experts: 66"), ("n_groups: 8 ", "n_groups: 6 ")],
         "parallelism.ep", "ep: 4", ["does not divide n_experts 66", "model.moe.n_experts"]),
    Case("groups_by_ep", [("n_experts: 64", "n_experts: 96"), ("n_groups: 8 ", "n_groups: 6 ")],
         "parallelism.ep", "ep: 4", ["a group would span EP ranks", "model.moe.n_groups"]),
    Case("ep_by_groups", [("n_experts: 64", "n_experts: 96"), ("n_groups: 8 ", "n_groups: 3 ")],
         "parallelism.ep", "ep: 4", ["not a multiple of n_groups 3", "model.moe.n_groups"]),
    Case("layers_vs_stages", [("n_layers: 4", "n_layers: 1")], "parallelism.pp", "pp: 2",
         ["only 1 layers", "model.n_layers"]),
    Case("microbatches_1f1b", [("microbatches: 4", "microbatches: 1")], "parallelism.pipeline.microbatches",
         "pipeline: {", ["microbatches >= pp", "parallelism.pp"]),
    Case("virtual_needs_interleaved", [("virtual_stages: 1", "virtual_stages: 2")],
         "parallelism.pipeline.virtual_stages", "pipeline: {", ["parallelism.pipeline.schedule"]),
    Case("global_batch", [("global_batch: 32", "global_batch: 30")], "train.global_batch", "global_batch: 30",
         ["dp * microbatches", "parallelism.dp", "try global_batch 32"]),
    Case("moe_tokens_by_tp", [("seq_len: 128", "seq_len: 127"), ("global_batch: 32", "global_batch: 8")],
         "train.seq_len", "seq_len: 127", ["not divisible by tp 2", "parallelism.tp"],
         ("parallelism.tp=2", "parallelism.dp=2")),
    Case("quant_group_size", [("group_size: 32", "group_size: 48")], "quantization.experts.group_size",
         "group_size: 48", ["d_model", "model.d_model"]),
    Case("moe_layer_range", [("layers: all ", "layers: [0, 4] ")], "model.moe.layers[1]", "layers: [0, 4]",
         ["layer 4 does not exist", "model.n_layers"]),
    Case("seq_len_max", [("  seq_len: 128", "  seq_len: 512")], "train.seq_len", "seq_len: 512",
         ["model.max_seq_len"]),
    Case("serve_seq_len", [("  max_seq_len: 256\n  routing_tables", "  max_seq_len: 1024\n  routing_tables")],
         "serve.max_seq_len", "max_seq_len: 1024", ["model.max_seq_len"]),
    Case("sequence_parallel_seq", [("seq_len: 128", "seq_len: 127"), ("global_batch: 32", "global_batch: 8")],
         "train.seq_len", "seq_len: 127", ["sequence parallelism", "parallelism.sequence_parallel"],
         ("parallelism.tp=2", "parallelism.dp=2", "parallelism.sequence_parallel=true", "model.moe.layers=[]")),
    Case("byte_vocab", [("vocab_size: 256", "vocab_size: 128")], "model.vocab_size", "vocab_size: 128",
         ["256 byte tokens", "train.data.kind"]),
    Case("sets_divide_groups", [("temperature: 0.1", "temperature: 0.1\n    sets: 3")], "routing.groups.sets",
         "sets: 3", ["3 sets do not divide the 8 expert groups", "model.moe.n_groups", "try sets"]),
    Case("max_sets_le_sets", [("temperature: 0.1", "temperature: 0.1\n    sets: 2\n    max_sets: 3")],
         "routing.groups.max_sets", "max_sets: 3", ["more than the 2 sets", "routing.groups.sets"]),
    Case("top_within_kept_sets", [("temperature: 0.1", "temperature: 0.1\n    sets: 8\n    max_sets: 1")],
         "routing.groups.top", "top: 2", ["hold only 1", "routing.groups.max_sets"]),
    Case("sets_onto_nodes", [("temperature: 0.1", "temperature: 0.1\n    sets: 2")], "routing.groups.sets",
         "sets: 2", ["do not map onto whole nodes", "spans 4 nodes", "parallelism.ep", "cluster.gpus_per_node"],
         ("cluster.nodes=8", "cluster.gpus_per_node=1")),
    Case("hierarchical_in_one_node",
         [("sequence_parallel: false", "sequence_parallel: false\n  expert_exchange: hierarchical")],
         "parallelism.expert_exchange", "expert_exchange: hierarchical", ["fits in one node", "parallelism.ep"]),
    Case("overlap_needs_ep", [("sequence_parallel: false", "sequence_parallel: false\n  expert_overlap: true")],
         "parallelism.expert_overlap", "expert_overlap: true", ["there is no all-to-all", "parallelism.ep"],
         ("parallelism.ep=1",)),
    Case("overlap_not_hierarchical",
         [("sequence_parallel: false", "sequence_parallel: false\n  expert_overlap: true\n"
           "  expert_exchange: hierarchical")], "parallelism.expert_overlap", "expert_overlap: true",
         ["not overlapped", "parallelism.expert_exchange"], ("cluster.nodes=4", "cluster.gpus_per_node=2")),
    Case("overlap_not_selective",
         [("sequence_parallel: false", "sequence_parallel: false\n  expert_overlap: true"),
          ("activation_checkpointing: none", "activation_checkpointing: selective")],
         "parallelism.expert_overlap", "expert_overlap: true", ["selective recomputation",
                                                                "parallelism.activation_checkpointing"]),
    Case("zero_bubble_no_recompute", [("schedule: 1f1b", "schedule: zb_h1"),
                                      ("activation_checkpointing: none", "activation_checkpointing: full")],
         "parallelism.pipeline.schedule", "pipeline: {", ["recomputed layer", "parallelism.activation_checkpointing"]),
    Case("zero_bubble_no_zero3", [("schedule: 1f1b", "schedule: zbv"), ("virtual_stages: 1", "virtual_stages: 2"),
                                  ("zero: 0", "zero: 3")],
         "parallelism.pipeline.schedule", "pipeline: {", ["ZeRO-3", "parallelism.zero"]),
    Case("zbv_two_virtual", [("schedule: 1f1b", "schedule: zbv")], "parallelism.pipeline.virtual_stages",
         "pipeline: {", ["2 stages per pipeline rank", "parallelism.pipeline.schedule"]),
    Case("text_data_path", [("data: {kind: builtin}", "data: {kind: text}")], "train.data.path", "data: {kind: text}",
         ["train.data.kind"]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_cross_field_rule(tmp_path, tiny_text, case):
    text = tiny_text
    for old, new in case.edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, text), case.overrides)
    matching = [p for p in err.value.problems if ".".join(map(str, p.path)).replace(".1", "[1]") == case.path]
    assert matching, f"no problem for {case.path}: {err.value}"
    problem = matching[0]
    assert problem.location.line == line_of(text, case.line_needle), str(problem)
    shown = str(problem)
    for needle in case.mentions:
        assert needle in shown, f"{needle!r} not in {shown!r}"


def test_related_fields_carry_their_lines(tmp_path, tiny_text):
    text = tiny_text.replace("n_groups: 8 ", "n_groups: 7 ")
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, text))
    assert f"model.moe.n_groups at line {line_of(text, 'n_groups: 7')}" in err.value.first.related


def test_routing_required_for_moe_and_refused_for_dense(tmp_path, tiny_text):
    routing = tiny_text[tiny_text.index("routing:\n"):tiny_text.index("quantization:\n")]
    with pytest.raises(SpecError, match="an MoE model needs a routing section"):
        load_spec(write(tmp_path, tiny_text.replace(routing, "")))


def test_dense_layers_need_ffn(tmp_path, tiny_text):
    ffn = tiny_text[tiny_text.index("  ffn:"):tiny_text.index("  moe:")]
    text = tiny_text.replace(ffn, "")
    assert load_spec(write(tmp_path, text)).model.ffn is None
    with pytest.raises(SpecError, match="dense but model.ffn is not set"):
        load_spec(write(tmp_path, text), ["model.moe.layers=[0, 1]"])


def test_longcat_hint_for_bad_group_count(tmp_path):
    from tests.conftest import SPECS

    with pytest.raises(SpecError) as err:
        load_spec(SPECS / "longcat-2.0.yaml", ["model.moe.n_groups=96"])
    assert err.value.first.hint == "try n_groups 80 or 100"
