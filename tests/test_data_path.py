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


@pytest.mark.parametrize("size, trains", [(100, 95), (135, 128)])
def test_a_corpus_shorter_than_one_sequence_is_named_with_both_lengths(project, size, trains):
    """tiny-moe's sequences are train.seq_len + 1 = 129 tokens (one per byte), cut from the first 95% of the
    corpus: 135 bytes give 128 to train on, one short."""
    from lcc.data.stream import DataError, check_corpus

    (project / "specs" / "corpus.txt").write_bytes(b"x" * size)
    with pytest.raises(DataError) as err:
        check_corpus(load_spec("specs/spec.yaml"))
    assert str(err.value).startswith(f"train.data.path: data file {Path('specs/corpus.txt')} has {size} tokens, of "
                                     f"which {trains} train (the last 5% are held out), fewer than one sequence of "
                                     "train.seq_len + 1 = 129")
    (project / "specs" / "corpus.txt").write_bytes(b"x" * 136)  # 129 to train on: enough
    check_corpus(load_spec("specs/spec.yaml"))


def test_cli_run_with_a_short_corpus_exits_2_before_any_rank_starts(project, monkeypatch):
    from typer.testing import CliRunner

    import lcc.runtime.launch
    from lcc.cli import app

    started = []
    monkeypatch.setattr(lcc.runtime.launch, "_launch", lambda *args: started.append(args))
    (project / "specs" / "corpus.txt").write_bytes(b"a short corpus: 32 bytes of text")
    world1 = ["parallelism.pp=1", "parallelism.dp=1", "parallelism.ep=1", "cluster.gpus_per_node=1"]
    result = CliRunner().invoke(app, ["run", "train", "specs/spec.yaml", *[a for s in world1 for a in ("--set", s)],
                                      "--steps", "1"])
    assert result.exit_code == 2 and started == []
    assert result.stderr == (f"lcc run train: train.data.path: data file {Path('specs/corpus.txt')} has 32 tokens, "
                             "of which 30 train (the last 5% are held out), fewer than one sequence of "
                             "train.seq_len + 1 = 129: give a longer corpus or a shorter train.seq_len\n")


def test_a_corpus_is_counted_in_the_models_tokens(project):
    """With a tokenizer.json the corpus is counted in its tokens (here fewer than the bytes: a BPE of the
    built-in corpus' words), as the ranks will cut it."""
    from tokenizers import Tokenizer

    from lcc.data.stream import DataError, check_corpus
    from tests.interop.hf_models import save_tokenizer

    save_tokenizer(project / "specs")
    text = "The small cat sees a bird near the river. " * 6  # 252 bytes
    (project / "specs" / "corpus.txt").write_text(text)
    tokens = len(Tokenizer.from_file(str(project / "specs" / "tokenizer.json")).encode(text).ids)
    assert tokens < 129 < len(text) * 0.95
    with pytest.raises(DataError, match=f"has {tokens} tokens, of which {int(tokens * 0.95)} train"):
        check_corpus(load_spec("specs/spec.yaml", ["model.tokenizer=tokenizer.json"]))
