"""train.data.path is relative to the spec file's folder (docs/spec.md), wherever lcc runs from; plans keep it as
written; a missing file is a located error, not a rank's traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lcc.spec import Spec, SpecError, load_spec, resolved, spec_hash
from lcc.spec.data import check_data, data_file
from tests.conftest import line_of

TEXT = "data: {kind: text, path: corpus.txt}"


@pytest.fixture
def project(tmp_path, tiny_text, monkeypatch) -> Path:
    """specs/spec.yaml beside its corpus, and another corpus.txt in the working directory."""
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "spec.yaml").write_text(tiny_text.replace("data: {kind: builtin}", TEXT))
    (tmp_path / "specs" / "corpus.txt").write_bytes(b"the spec's corpus. " * 50)
    (tmp_path / "corpus.txt").write_bytes(b"the working directory's corpus. " * 50)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_relative_data_path_is_read_from_the_spec_folder(project):
    from lcc.data.stream import corpus_tokens

    spec = load_spec("specs/spec.yaml")
    assert data_file(spec) == Path("specs/corpus.txt")
    expected = list((project / "specs" / "corpus.txt").read_bytes())
    assert corpus_tokens(spec).tolist() == expected
    # a plan carries the resolved spec without its folder: the runtime passes the folder along
    plain = Spec.model_validate(resolved(spec))
    assert corpus_tokens(plain, Path("specs")).tolist() == expected


def test_plans_keep_the_path_as_written(project, tiny_text):
    spec = load_spec(project / "specs" / "spec.yaml")
    assert resolved(spec)["train"]["data"]["path"] == "corpus.txt"
    (project / "other").mkdir()
    (project / "other" / "spec.yaml").write_text((project / "specs" / "spec.yaml").read_text())
    assert spec_hash(load_spec(project / "other" / "spec.yaml")) == spec_hash(spec)


def test_absolute_data_path_is_used_as_is(project):
    absolute = project / "corpus.txt"
    spec = load_spec("specs/spec.yaml", [f"train.data.path={absolute}"])
    assert data_file(spec) == absolute


def test_missing_data_file_names_the_field_and_the_resolved_path(project):
    (project / "specs" / "corpus.txt").unlink()
    spec = load_spec("specs/spec.yaml")
    with pytest.raises(SpecError) as err:
        check_data(spec)
    problem = err.value.first
    assert problem.path == ("train", "data", "path")
    assert problem.location.line == line_of((project / "specs" / "spec.yaml").read_text(), TEXT)
    assert f"cannot read data file {Path('specs/corpus.txt')}" in problem.message
    assert "spec file's folder" in problem.hint


def test_corpus_tokens_names_the_field_when_the_file_is_missing(project):
    from lcc.data.stream import DataError, corpus_tokens

    (project / "specs" / "corpus.txt").unlink()
    with pytest.raises(DataError, match=r"train.data.path: cannot read data file specs/corpus.txt"):
        corpus_tokens(load_spec("specs/spec.yaml"))


def test_cli_run_with_a_missing_data_file_exits_2_without_traceback(project):
    (project / "specs" / "corpus.txt").unlink()
    out = subprocess.run([sys.executable, "-m", "lcc", "run", "train", "specs/spec.yaml", "--steps", "1"],
                         capture_output=True, text=True, cwd=project, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "train.data.path: cannot read data file specs/corpus.txt" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (project / ".lcc-cache").exists()  # nothing compiled for a run that cannot start


def test_cli_run_passes_the_spec_folder_to_the_ranks(project, monkeypatch):
    from typer.testing import CliRunner

    import lcc.runtime.launch
    from lcc.cli import app

    calls = []
    monkeypatch.setattr(lcc.runtime.launch, "launch", lambda *args, **kwargs: calls.append(kwargs))
    world1 = ["parallelism.pp=1", "parallelism.dp=1", "parallelism.ep=1", "cluster.gpus_per_node=1"]
    sets = [a for s in world1 for a in ("--set", s)]
    result = CliRunner().invoke(app, ["run", "train", "specs/spec.yaml", *sets, "--steps", "1"])
    assert result.exit_code == 0, result.output
    assert calls and calls[0]["spec_dir"] == Path("specs")
