"""`lcc data prepare` and training on what it writes: JSON Lines, Parquet and text files made here become token
files that round-trip to each document's tokens exactly, with the boundaries right; a re-run does nothing,
a changed input is prepared again, workers change nothing; bad input gets exit 2 naming the file and line or
field, with nothing written; training reads the prepared data and refuses what does not fit before any rank
starts."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lcc.cli import app
from lcc.compiler.output import write
from lcc.compiler.plan import compile_plan
from lcc.data.prepare import render_chat
from lcc.runtime.launch import launch, read_metrics
from lcc.runtime.support import RunError
from lcc.spec import load_spec
from tests.conftest import SPECS
from tests.interop.hf_models import save_tokenizer

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "far", "away", "into", "green", "fields"]
WORLD1 = ["parallelism.pp=1", "parallelism.dp=1", "parallelism.tp=1", "parallelism.ep=1", "cluster.gpus_per_node=1",
          "parallelism.pipeline.microbatches=1", "model.n_layers=2", "train.seq_len=32", "train.global_batch=4",
          "train.dtype=float64"]


def cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output + (str(result.exception) if result.exit_code not in (0, 1, 2) else "")


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 40))) + ("é" if i % 7 == 0 else "")
            for i in range(n)]


def sources(folder: Path) -> tuple[list[Path], list[str]]:
    """A JSON Lines file, a Parquet file and a text file; the documents in the order they are prepared."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    a, b = texts(120, 1), texts(80, 2)
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": t, "n": i}) + "\n" + ("\n" if i == 3 else "")
                                            for i, t in enumerate(a)))
    pq.write_table(pa.table({"id": list(range(len(b))), "text": b}), folder / "b.parquet", row_group_size=30)
    (folder / "c.txt").write_text("One document\nof two lines.\n")
    return [folder / "a.jsonl", folder / "b.parquet", folder / "c.txt"], [*a, *b, "One document\nof two lines.\n"]


def read(out: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.fromfile(out / "tokens.bin", dtype="<i4"), np.fromfile(out / "documents.bin", dtype="<i8")


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, list[Path], list[str]]:
    base = tmp_path_factory.mktemp("data")
    files, docs = sources(base / "src")
    return base, files, docs


def test_prepared_tokens_round_trip_with_every_boundary_right(made):
    base, files, docs = made
    out = base / "bytes"
    code, text = cli("data", "prepare", *files, "--spec", SPECS / "tiny-moe.yaml", "--out", out, "--workers", 1)
    assert code == 0, text
    tokens, ends = read(out)
    assert len(ends) == len(docs) and ends[-1] == len(tokens)
    starts = [0, *ends[:-1]]
    for doc, a, b in zip(docs, starts, ends, strict=True):  # byte-level: no end-of-sequence id
        assert bytes(tokens[a:b].astype(np.uint8)).decode() == doc
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokens"] == len(tokens) and manifest["documents"] == len(docs)
    assert [s["path"] for s in manifest["sources"]] == [str(f.resolve()) for f in files]
    code, text = cli("data", "prepare", *files, "--spec", SPECS / "tiny-moe.yaml", "--out", out)
    assert code == 0 and "up to date" in text, text
    two = base / "two-workers"  # the same bytes whatever the number of processes
    code, text = cli("data", "prepare", *files, "--spec", SPECS / "tiny-moe.yaml", "--out", two, "--workers", 2)
    assert code == 0, text
    assert all((out / n).read_bytes() == (two / n).read_bytes() for n in ("tokens.bin", "documents.bin"))


def test_a_changed_input_is_prepared_again(tmp_path):
    files, docs = sources(tmp_path / "src")
    out = tmp_path / "out"
    assert cli("data", "prepare", *files, "--spec", SPECS / "tiny-moe.yaml", "--out", out)[0] == 0
    with open(files[0], "a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    code, text = cli("data", "prepare", *files, "--spec", SPECS / "tiny-moe.yaml", "--out", out)
    assert code == 0 and "wrote" in text, text
    tokens, ends = read(out)
    assert len(ends) == len(docs) + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary folder left


def test_a_tokenizer_json_and_its_end_of_sequence_id(tmp_path):
    """Documents through the spec's tokenizer.json, each ended by serve.stop_token_ids[0]."""
    from tokenizers import Tokenizer

    save_tokenizer(tmp_path)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts(20)))
    sets = ["model.vocab_size=128", f"model.tokenizer={tmp_path / 'tokenizer.json'}", "serve.stop_token_ids=[2]"]
    code, text = cli("data", "prepare", tmp_path / "d.jsonl", "--spec", SPECS / "tiny-moe.yaml", "--out",
                     tmp_path / "out", "--text-field", "body", *[a for s in sets for a in ("--set", s)])
    assert code == 0, text
    tokens, ends = read(tmp_path / "out")
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    want = [i for t in texts(20) for i in [*tok.encode(t, add_special_tokens=False).ids, 2]]
    assert tokens.tolist() == want and all(tokens[e - 1] == 2 for e in ends)


def test_chat_records_mask_everything_but_the_assistant_turns(tmp_path):
    chats = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
              {"role": "user", "content": "and?"}, {"role": "assistant", "content": "bye"}]]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    out = tmp_path / "out"
    code, text = cli("data", "prepare", tmp_path / "c.jsonl", "--spec", SPECS / "tiny-moe.yaml", "--out", out, "--chat")
    assert code == 0, text
    tokens = np.fromfile(out / "tokens.bin", dtype="<i4")
    mask = np.fromfile(out / "loss_mask.bin", dtype=np.uint8)
    rendered, _ = render_chat(None, chats[0])
    assert bytes(tokens.astype(np.uint8)).decode() == rendered
    kept = bytes(tokens[mask == 1].astype(np.uint8)).decode()
    assert kept == "hello there\nbye\n"  # each reply and the newline that ends it, in lcc's own format


@pytest.mark.parametrize("name,content,says", [
    ("bad.jsonl", '{"text": "a"}\n{"text": "b"\n', "bad.jsonl:2: not a JSON object"),
    ("field.jsonl", '{"text": "a"}\n{"body": "b"}\n', "field.jsonl:2: no field 'text' (its fields: body)"),
    ("type.jsonl", '{"text": 5}\n', "type.jsonl:1: 'text' is int, not text"),
    ("empty.jsonl", "\n\n", "the sources hold no documents"),
    ("nothing.csv", "a,b\n", "not a file lcc reads"),
])
def test_bad_input_is_named_and_nothing_is_written(tmp_path, name, content, says):
    (tmp_path / name).write_text(content)
    code, text = cli("data", "prepare", tmp_path / name, "--spec", SPECS / "tiny-moe.yaml", "--out", tmp_path / "out")
    assert code == 2 and says in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_parquet_file_without_the_field_a_missing_path_and_a_folder_that_is_not_a_dataset(made, tmp_path):
    base, files, _ = made
    code, text = cli("data", "prepare", files[1], "--spec", SPECS / "tiny-moe.yaml", "--out", tmp_path / "o",
                     "--text-field", "body")
    assert code == 2 and f"{files[1]}: no column 'body' (its columns: id, text)" in text, text
    code, text = cli("data", "prepare", tmp_path / "nothere", "--spec", SPECS / "tiny-moe.yaml", "--out",
                     tmp_path / "o")
    assert code == 2 and "nothere: no such file or folder" in text, text
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, text = cli("data", "prepare", files[2], "--spec", SPECS / "tiny-moe.yaml", "--out", tmp_path / "mine")
    assert code == 2 and "is not a prepared dataset" in text and (tmp_path / "mine" / "notes.txt").is_file()


def test_training_reads_prepared_data_and_refuses_what_does_not_fit(made, tmp_path):
    base, files, docs = made
    data = base / "bytes"
    if not (data / "manifest.json").is_file():
        assert cli("data", "prepare", *files, "--spec", SPECS / "tiny-moe.yaml", "--out", data)[0] == 0
    spec = load_spec(SPECS / "tiny-moe.yaml", [*WORLD1, "train.data.kind=prepared", f"train.data.path={data}",
                                               "train.eval_every=1"])
    write(compile_plan(spec), tmp_path / "plan")
    launch(tmp_path / "plan", 2, tmp_path / "m.jsonl", quiet=True)
    assert [("val_loss" in r) for r in read_metrics(tmp_path / "m.jsonl")] == [True, True]
    # the launcher refuses, before any rank starts: data tokenized for another model, and too little data
    other = tmp_path / "other"
    save_tokenizer(tmp_path)
    sets = ["model.vocab_size=128", f"model.tokenizer={tmp_path / 'tokenizer.json'}"]
    assert cli("data", "prepare", files[2], "--spec", SPECS / "tiny-moe.yaml", "--out", other,
               *[a for s in sets for a in ("--set", s)])[0] == 0
    for path, says in ((other, "was tokenized by tokenizer "), (None, "fewer than one sequence")):
        if path is None:
            path = tmp_path / "short"
            shutil.copytree(data, path)
            small = json.loads((path / "manifest.json").read_text())
            assert cli("data", "prepare", files[2], "--spec", SPECS / "tiny-moe.yaml", "--out", path)[0] == 0
            assert json.loads((path / "manifest.json").read_text())["tokens"] < small["tokens"]
        plan = tmp_path / f"plan-{path.name}"
        write(compile_plan(load_spec(SPECS / "tiny-moe.yaml", [*WORLD1, "train.data.kind=prepared",
                                                                 f"train.data.path={path}"])), plan)
        with pytest.raises(RunError) as err:
            launch(plan, 1, quiet=True)
        assert says in str(err.value) and "train.data.path" in str(err.value), str(err.value)


def test_a_blend_takes_each_dataset_in_its_share_and_order_and_a_validation_folder_of_its_own(tmp_path):
    """Three prepared datasets of one letter each, blended 3 : 1 (and validated on the third): of every 1,024
    sequences 768 come from the first, each dataset read in its own order from its start; training and
    validation run on them."""
    from lcc.data.prepared import BlendedStream
    from lcc.data.stream import streams

    for letter in "abc":
        (tmp_path / f"{letter}.txt").write_text(letter * 3000 + "\n")
        assert cli("data", "prepare", tmp_path / f"{letter}.txt", "--spec", SPECS / "tiny-moe.yaml", "--out",
                   tmp_path / letter)[0] == 0
    blend = ["train.data.kind=prepared", f"train.data.blend=[{{path: {tmp_path / 'a'}, weight: 3}}, "
             f"{{path: {tmp_path / 'b'}, weight: 1}}]", f"train.data.validation={tmp_path / 'c'}",
             "train.eval_every=1"]
    spec = load_spec(SPECS / "tiny-moe.yaml", [*WORLD1, *blend])
    stream, val = streams(spec, None, None, spec.train.seq_len, None, True)
    assert isinstance(stream, BlendedStream)
    first = stream.sequences(0, 2048)[:, 0].tolist()
    assert [first[:1024].count(c) for c in (ord("a"), ord("b"))] == [768, 256]
    assert first[:1024] == first[1024:]
    assert set(val.sequences(0, 4).flatten().tolist()) <= {ord("c"), ord("\n")}
    write(compile_plan(spec), tmp_path / "plan")
    launch(tmp_path / "plan", 1, tmp_path / "m.jsonl", quiet=True)
    assert "val_loss" in read_metrics(tmp_path / "m.jsonl")[0]
    code, text = cli("compile", SPECS / "tiny-moe.yaml", "--out", tmp_path / "bad", "--set", "train.data.kind=prepared",
                     "--set", f"train.data.path={tmp_path / 'a'}", "--set", "train.data.blend=[{path: x, weight: 1}]")
    assert code == 2 and "train.data.path: data kind prepared needs a path or a blend (not both)" in text, text


def test_a_hugging_face_dataset_saved_to_disk(tmp_path):
    """The Arrow files `datasets`' save_to_disk writes, found in its folder; a DatasetDict's folder is refused
    naming its splits."""
    datasets = pytest.importorskip("datasets")
    docs = texts(30, 7)
    datasets.Dataset.from_dict({"text": docs, "n": list(range(30))}).save_to_disk(str(tmp_path / "ds"))
    code, text = cli("data", "prepare", tmp_path / "ds", "--spec", SPECS / "tiny-moe.yaml", "--out", tmp_path / "out")
    assert code == 0, text
    tokens, ends = read(tmp_path / "out")
    starts = [0, *ends[:-1]]
    assert [bytes(tokens[a:b].astype(np.uint8)).decode() for a, b in zip(starts, ends, strict=True)] == docs
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs}),
                          "test": datasets.Dataset.from_dict({"text": docs[:3]})}).save_to_disk(str(tmp_path / "dd"))
    code, text = cli("data", "prepare", tmp_path / "dd", "--spec", SPECS / "tiny-moe.yaml", "--out", tmp_path / "o2")
    assert code == 2 and "a Hugging Face DatasetDict; give the folder of one of its splits (test, train)" in text
    code, text = cli("data", "prepare", tmp_path / "dd" / "train", "--spec", SPECS / "tiny-moe.yaml", "--out",
                     tmp_path / "o2")
    assert code == 0, text
