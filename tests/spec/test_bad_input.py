"""Hostile or broken files: each gives a SpecError naming the file and a line, quickly; never a hang."""

from __future__ import annotations

import pytest

from lcc.spec import SpecError, load_spec
from lcc.spec.yaml_source import MAX_BYTES

BILLION_LAUGHS = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]" for i in range(8)]
)

CASES = {
    "empty": (b"", "file is empty"),
    "only_comments": (b"# nothing here\n", "file is empty"),
    "binary": (bytes(range(256)) * 4, "not UTF-8"),
    "nul_byte": (b"name: x\n\x00\n", "NUL byte"),
    "top_level_list": (b"- name: x\n- seed: 1\n", "a spec is a mapping of sections; got a list"),
    "top_level_scalar": (b"just a string\n", "a spec is a mapping of sections; got a str"),
    "deep_nesting": (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nest"),
    "deep_block_nesting": ("".join(f"{'  ' * i}k{i}:\n" for i in range(200)).encode(), "nested more than"),
    "alias_bomb": (BILLION_LAUGHS.encode(), "expands to more than"),
    "recursive_alias": (b"a: &a [*a]\n", "recursive alias"),
    "python_tag": (b"name: !!python/object/apply:os.system ['echo hi']\n", "unsupported YAML tag"),
    "custom_tag": (b"name: !foo bar\n", "unsupported YAML tag"),
    "bad_syntax": (b"model: {d_model: 1\n", "not valid YAML"),
    "tabs": (b"model:\n\td_model: 1\n", "not valid YAML"),
    "two_documents": (b"name: a\n---\nname: b\n", "more than one YAML document"),
    "non_string_key": (b"1: x\n", "mapping keys must be plain names"),
    "merge_key": (b"base: &b {x: 1}\nmodel:\n  <<: *b\n", "merge keys"),
    "huge": (b"# " + b"x" * (MAX_BYTES + 10) + b"\n", "a spec is at most"),
}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", list(CASES))
def test_bad_file(tmp_path, name):
    raw, needle = CASES[name]
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(raw)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    text = str(err.value)
    assert needle in text
    problem = err.value.first
    assert problem.location.source == str(path)
    assert problem.location.line is not None and problem.location.line >= 1


def test_error_line_of_syntax_error(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: x\nmodel:\n  d_model: [1, 2\n  n_layers: 3\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert err.value.first.location.line in (3, 4)


def test_directory_is_not_a_spec(tmp_path):
    with pytest.raises(SpecError, match="cannot read spec"):
        load_spec(tmp_path)


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("overrides", "needle"), [
    (["parallelism.dp=100000000000000003"], "parallelism.dp"),
    (["model.moe.n_experts=1000000000000000003"], "model.moe.n_experts"),
    (["cluster.device.memory_gib=.inf"], "cluster.device.memory_gib"),
    (["cluster.device.peak_tflops=1e400"], "cluster.device.peak_tflops"),
    (["cluster.device.peak_tflops=1.0e-320"], "cluster.device.peak_tflops"),
    (["cluster.network.inter_node_gbps=.nan"], "cluster.network.inter_node_gbps"),
    (["model.n_layers=1000000000"], "model.n_layers"),
    (["parallelism.tp=true"], "parallelism.tp"),
    (["model.moe.layers=" + "[" * 500 + "]" * 500], "cannot read value"),
])
def test_extreme_values_are_clean_errors(overrides, needle):
    from tests.conftest import SPECS

    with pytest.raises(SpecError) as err:
        load_spec(SPECS / "tiny-moe.yaml", overrides)
    assert needle in str(err.value)


def test_section_created_by_override_is_located_at_the_override(tmp_path):
    from tests.conftest import SPECS

    text = (SPECS / "tiny-moe.yaml").read_text().split("\nserve:")[0]
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as err:
        load_spec(path, ["serve.max_batch=4"])  # serve.max_seq_len is then missing
    assert err.value.first.location.source == "--set serve.max_batch=4"


def test_null_override_of_optional_text():
    from tests.conftest import SPECS

    spec = load_spec(SPECS / "tiny-moe.yaml", ["train.data.path=null"])
    assert spec.train.data.path is None


def test_many_problems_are_capped_in_the_message(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("".join(f"k{i}: 1\n" for i in range(200)))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert len(err.value.problems) > 200 and "... and" in str(err.value)
