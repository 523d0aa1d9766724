from __future__ import annotations

import pytest

from lcc.spec import SpecError, load_spec, spec_hash
from tests.conftest import SHIPPED, line_of, write


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_specs_validate(path):
    spec = load_spec(path)
    assert spec.name == path.stem
    assert spec.parallelism.world_size == spec.cluster.n_devices


def test_override_is_typed_by_the_schema(tmp_path, tiny_text):
    spec = load_spec(write(tmp_path, tiny_text), ["parallelism.pipeline.microbatches=8", "model.moe.layers=[0, 2]",
                                                  "name=123", "routing.capacity_factor=1.5"])
    assert spec.parallelism.pipeline.microbatches == 8
    assert spec.model.moe_layers == (0, 2)
    assert spec.name == "123"  # a text field keeps the text, it is not read as a number
    assert spec.routing.capacity_factor == 1.5


def test_override_creates_a_missing_section(tmp_path, tiny_text):
    text = tiny_text.replace("serve:\n  max_batch: 16\n  max_seq_len: 256\n  routing_tables: true\n", "")
    spec = load_spec(write(tmp_path, text), ["serve.max_seq_len=64"])
    assert spec.serve is not None and spec.serve.max_seq_len == 64


def test_override_errors_name_the_command_line(tmp_path, tiny_text):
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, tiny_text), ["model.moe.n_expert=3"])
    assert "--set model.moe.n_expert=3" in str(err.value)
    assert "did you mean 'n_experts'" in str(err.value)
    with pytest.raises(SpecError, match="expected --set a.b.c=value"):
        load_spec(write(tmp_path, tiny_text), ["parallelism.dp"])


def test_override_value_error_points_at_the_override(tmp_path, tiny_text):
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, tiny_text), ["parallelism.zero=5"])
    problem = err.value.first
    assert problem.location.source == "--set parallelism.zero=5"
    assert problem.path == ("parallelism", "zero")


def test_unknown_field_names_line_and_suggests(tmp_path, tiny_text):
    text = tiny_text.replace("    n_groups: 8", "    n_group: 8")
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, text))
    p = err.value.first
    assert p.path == ("model", "moe", "n_group")
    assert p.location.line == line_of(text, "n_group: 8")
    assert p.hint == "did you mean 'n_groups'?"


def test_missing_field_points_at_its_section(tmp_path, tiny_text):
    text = tiny_text.replace("  d_model: 128\n", "")
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, text))
    p = err.value.first
    assert p.path == ("model", "d_model")
    assert "required" in p.message
    assert p.location.line == line_of(text, "model:")


def test_wrong_type_names_value_and_line(tmp_path, tiny_text):
    text = tiny_text.replace("  n_layers: 4", "  n_layers: four")
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, text))
    p = err.value.first
    assert p.path == ("model", "n_layers") and "'four'" in p.message
    assert (p.location.line, p.location.column) == (line_of(text, "n_layers: four"), 3)


def test_all_problems_are_reported_at_once(tmp_path, tiny_text):
    text = tiny_text.replace("  n_layers: 4", "  n_layers: -1").replace("  d_model: 128", "  d_model: x")
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, text))
    assert {p.path for p in err.value.problems} == {("model", "n_layers"), ("model", "d_model")}


def test_union_field_gives_one_problem(tmp_path, tiny_text):
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, tiny_text), ["model.moe.layers=every"])
    assert len(err.value.problems) == 1
    assert "'all'" in err.value.first.message


def test_duplicate_key_is_an_error(tmp_path, tiny_text):
    text = tiny_text.replace("  d_model: 128\n", "  d_model: 128\n  d_model: 64\n")
    with pytest.raises(SpecError, match="duplicate key 'd_model'"):
        load_spec(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="cannot read spec"):
        load_spec(tmp_path / "nope.yaml")


def test_hash_follows_resolved_values(tmp_path, tiny_text):
    a = load_spec(write(tmp_path, tiny_text))
    b = load_spec(write(tmp_path, tiny_text.replace("  steps: 200", "  steps: 200  # same")))
    c = load_spec(write(tmp_path, tiny_text), ["train.steps=201"])
    assert spec_hash(a) == spec_hash(b) != spec_hash(c)


def test_dense_model_is_valid(tmp_path, tiny_text):
    text = tiny_text.split("  moe:\n")[0] + "\n" + tiny_text.split("capacity_factor: null     # dropless\n")[1]
    quant = "quantization:\n  experts: {bits: 4, group_size: 32, symmetric: true}   # int4 experts when serving\n"
    text = text.replace(quant, "").replace("  ep: 4 ", "  ep: 1 ")
    spec = load_spec(write(tmp_path, text))
    assert not spec.has_moe and spec.model.moe_layers == ()


@pytest.mark.parametrize("name", [".", "..", "...", ".hidden", "-x", "a/b", ""])
def test_name_must_be_a_plain_folder_name(tmp_path, tiny_text, name):
    # the name is the output folder generated/<name>/: `..` would write the plan into the working directory
    text = tiny_text.replace("name: tiny-moe", f"name: '{name}'")
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, text))
    problem = err.value.first
    assert problem.path == ("name",)
    assert (problem.location.line, problem.location.column) == (line_of(text, "name: '"), 1)
    assert "folder name" in problem.message and "try name:" in problem.hint
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, tiny_text), [f"name={name}"])
    assert err.value.first.location.source == f"--set name={name}"


@pytest.mark.parametrize("name", ["123", "v1.0_x-y", "a..b"])
def test_plain_names_are_accepted(tmp_path, tiny_text, name):
    assert load_spec(write(tmp_path, tiny_text), [f"name={name}"]).name == name


def test_name_hint_proposes_a_valid_name(tmp_path, tiny_text):
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, tiny_text), ["name=.My Model"])
    assert err.value.first.hint.endswith("try name: my-model")
