"""Checkpoints: layout-free keys, resuming under another layout, the identity check, `lcc checkpoint info`."""

from __future__ import annotations

import errno
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

import lcc
from lcc.compiler.output import write
from lcc.compiler.plan import compile_plan
from lcc.data.corpus import builtin_corpus
from lcc.data.prepare import Encoder, prepare
from lcc.plan.types import Parameter, Shard
from lcc.runtime.checkpoint_dir import latest, prune
from lcc.runtime.checkpoint_files import IDENTITY, CheckpointError
from lcc.runtime.checkpoint_identity import SCHEMA, spec_differences, spec_hash
from lcc.runtime.checkpoint_info import describe
from lcc.runtime.checkpoint_layout import Blocks, flat_boxes, local_blocks
from lcc.runtime.checkpoint_lock import locked
from lcc.runtime.checkpoint_resume import check_resume
from lcc.runtime.checkpoint_verify import verify
from lcc.runtime.launch import launch, read_metrics
from lcc.runtime.preflight import LaunchRefused
from lcc.runtime.support import RunError
from lcc.serve.weights import check_checkpoint
from lcc.spec import load_spec, resolved
from tests.conftest import ROOT, SPECS
from tests.runtime.equivalence import SMALL

# the layout saved in, and two others: units per step stay 4 (dp x micro-batches)
DP4_EP4_ZERO2 = ["parallelism.pp=1", "parallelism.dp=4", "parallelism.tp=1", "parallelism.ep=4", "parallelism.zero=2",
                 "parallelism.pipeline.microbatches=1", "cluster.gpus_per_node=4"]
PP2_TP2 = ["parallelism.pp=2", "parallelism.dp=1", "parallelism.tp=2", "parallelism.ep=1", "parallelism.zero=0",
           "parallelism.pipeline.microbatches=4", "cluster.gpus_per_node=4"]
DP2_EP2_TP2_ZERO3_SP = ["parallelism.pp=1", "parallelism.dp=2", "parallelism.tp=2", "parallelism.ep=2",
                        "parallelism.zero=3", "parallelism.sequence_parallel=true",
                        "parallelism.activation_checkpointing=selective", "parallelism.pipeline.microbatches=2",
                        "cluster.gpus_per_node=4"]
WORLD1 = ["parallelism.pp=1", "parallelism.dp=1", "parallelism.tp=1", "parallelism.ep=1", "cluster.gpus_per_node=1",
          "parallelism.pipeline.microbatches=1", "model.n_layers=2"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resume_under_other_layouts_continues_the_run(tmp_path):
    """tiny-moe trained 10 steps under dp 4 x ep 4 with ZeRO 2 on a prepared dataset (lcc data prepare), saved,
    resumed to step 12 under the same layout (bitwise), under pp 2 x tp 2 and under dp 2 x ep 2 x tp 2 with
    ZeRO 3 and sequence parallelism (1e-8): the losses of an uninterrupted run, which read the same samples."""
    layouts = {"same": DP4_EP4_ZERO2, "pp2_tp2": PP2_TP2, "zero3_sp": DP2_EP2_TP2_ZERO3_SP}
    text = builtin_corpus()[:96_000].decode()
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": text[i:i + 3000]}) + "\n"
                                                 for i in range(0, len(text), 3000)))
    prepare([tmp_path / "docs.jsonl"], Encoder(256, None, None, False, None), None, tmp_path / "data")
    data = ["train.data.kind=prepared", f"train.data.path={tmp_path / 'data'}"]
    plans = {}
    for name, layout in layouts.items():
        plans[name] = tmp_path / name
        # saving every 10 steps is not part of what a resume compares (train.checkpoint_every)
        write(compile_plan(load_spec(SPECS / "tiny-moe.yaml", [*SMALL, *layout, *data,
                                                               "train.checkpoint_every=10"])), plans[name])
    # the uninterrupted run, which saves after step 10 (and at its end)
    launch(plans["same"], 12, tmp_path / "straight.jsonl", quiet=True, checkpoints=tmp_path / "ckpt")
    assert latest(tmp_path / "ckpt").name == "step-000012"
    shutil.rmtree(tmp_path / "ckpt" / "step-000012")
    (tmp_path / "ckpt" / "latest").write_text("step-000010\n")
    info = describe(tmp_path / "ckpt")
    assert info["step"] == 10
    shapes = {t["key"]: (t["shape"], t["chunks"]) for t in info["tensors"]}
    assert shapes["model/layers.0.ffn.experts.w1_EFD"][0] == [16, 64, 128]  # global, whatever the layout
    assert shapes["optim/layers.0.ffn.experts.w1_EFD/exp_avg"][1] == 4  # the ep slices
    assert shapes["optim/embed.weight/exp_avg"][1] == 4  # the ZeRO pieces over dp
    assert shapes["model/embed.weight"][1] == 1  # replicated over dp: written once
    assert not any("#" in key for key in shapes)
    (tmp_path / "first.jsonl").write_text("".join((tmp_path / "straight.jsonl").read_text().splitlines(True)[:10]))
    straight = [m["loss"] for m in read_metrics(tmp_path / "straight.jsonl")]
    for name, plan in plans.items():
        checkpoints = tmp_path / f"ckpt-{name}"
        shutil.copytree(tmp_path / "ckpt", checkpoints)
        metrics = tmp_path / f"{name}.jsonl"
        shutil.copy(tmp_path / "first.jsonl", metrics)
        launch(plan, 12, metrics, quiet=True, checkpoints=checkpoints, resume=True)
        records = read_metrics(metrics)
        assert [m["step"] for m in records] == list(range(1, 13))
        losses = [m["loss"] for m in records]
        if name == "same":
            assert losses == straight  # bitwise: the same blocks, moments, biases, data position
        else:
            assert losses[10:] == pytest.approx(straight[10:], rel=1e-8, abs=0), name
        assert latest(checkpoints).name == "step-000012"


# ------------------------------------------------------------------------------------- blocks, resharding
def test_flat_boxes_are_the_flat_range_in_order():
    for shape in [(), (5,), (3, 4), (2, 3, 4), (2, 1, 3, 2)]:
        n = math.prod(shape)
        values = torch.arange(n).view(shape)
        for lo, hi in itertools.combinations_with_replacement(range(n + 1), 2):
            got = []
            for offsets, sizes in flat_boxes(shape, lo, hi):
                got += values[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))].reshape(-1).tolist()
            assert got == list(range(lo, hi)), (shape, lo, hi)
            assert len(flat_boxes(shape, lo, hi)) <= 2 * max(len(shape), 1) - 1


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, on purpose
def test_blocks_reshard_between_slices_and_zero_pieces(tmp_path):
    """Saved as tp halves (rows) cut into uneven ZeRO pieces (the last padded); loaded as column halves, and
    as a ZeRO piece of another cut: DCP's planner reads the overlaps."""
    full = torch.randn(6, 5, dtype=torch.float64)
    meta = Parameter("w", [6, 5], [3, 5], [0], shard=Shard(0, "tp", 2))
    blocks = []
    for half, (lo, hi) in itertools.product(range(2), [(0, 8), (8, 15)]):
        piece = full[3 * half:3 * half + 3].reshape(-1)[lo:hi].clone()
        padded = torch.cat([piece, piece.new_zeros(8 - piece.numel())])  # the last piece is padded
        blocks += local_blocks(meta, (3 * half, 0), padded, (lo, hi))._blocks.items()
    dcp.save({"model/w": Blocks([6, 5], torch.float64, blocks)}, checkpoint_id=str(tmp_path), no_dist=True)

    left, right = torch.zeros(6, 2, dtype=torch.float64), torch.zeros(6, 3, dtype=torch.float64)
    dcp.load({"model/w": Blocks([6, 5], torch.float64, [((0, 0), left), ((0, 2), right)])},
             checkpoint_id=str(tmp_path), no_dist=True)
    assert torch.equal(torch.cat([left, right], 1), full)
    piece = torch.zeros(7, dtype=torch.float64)  # elements [4, 11) of the second row half
    dcp.load({"model/w": local_blocks(meta, (3, 0), piece, (4, 11))}, checkpoint_id=str(tmp_path), no_dist=True)
    assert torch.equal(piece, full[3:].reshape(-1)[4:11])


# ---------------------------------------------------------------------- one small checkpoint (world 1)
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A world-1 tiny-moe (2 layers) trained 1 step and saved: (plan folder, checkpoint directory)."""
    root = tmp_path_factory.mktemp("world1")
    write(compile_plan(load_spec(SPECS / "tiny-moe.yaml", [*SMALL, *WORLD1])), root / "plan")
    launch(root / "plan", 1, quiet=True, checkpoints=root / "ckpt")
    return root / "plan", root / "ckpt"


def _copy(saved, tmp_path, edit=None):
    """A copy of the saved checkpoint directory, its lcc-checkpoint.json changed by `edit`."""
    checkpoints = tmp_path / "ckpt"
    shutil.copytree(saved[1], checkpoints)
    if edit is not None:
        path = checkpoints / "step-000001" / IDENTITY
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
    return checkpoints


def test_identity_names_the_spec_and_the_layout(saved):
    plan, checkpoints = saved
    text = (checkpoints / "step-000001" / IDENTITY).read_text()
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"  # deterministic
    assert data["schema"] == SCHEMA and data["step"] == 1
    assert data["spec"] == json.loads((plan / "spec.json").read_text())
    assert data["layout"]["world_size"] == 1 and data["layout"]["zero"] == 0
    assert data["lcc_version"] == lcc.__version__ and data["spec_hash"] == spec_hash(data["spec"])
    folder = checkpoints / "step-000001"
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(data["files"]) == [name for name in on_disk if name != IDENTITY]  # every file DCP wrote
    assert ".metadata" in data["files"] and all(f["bytes"] == (folder / n).stat().st_size
                                                for n, f in data["files"].items())
    verify(folder)


def test_spec_hash_covers_the_model_and_training_but_not_the_layout(saved):
    spec = json.loads((saved[0] / "spec.json").read_text())
    other_layout = resolved(load_spec(SPECS / "tiny-moe.yaml", [*SMALL, *DP2_EP2_TP2_ZERO3_SP, "model.n_layers=2",
                                                                "train.checkpoint_every=5"]))
    assert spec_hash(other_layout) == spec_hash(spec)
    other_lr = resolved(load_spec(SPECS / "tiny-moe.yaml", [*SMALL, *WORLD1, "train.optimizer.lr=0.002"]))
    assert spec_hash(other_lr) != spec_hash(spec)


def test_resume_refuses_another_spec_naming_each_field(saved, tmp_path):
    def other_run(data):
        data["spec"]["train"]["optimizer"]["lr"] = 0.002
        data["spec"]["routing"]["groups"]["top"] = 3

    checkpoints = _copy(saved, tmp_path, other_run)
    with pytest.raises(RunError) as err:  # launch() checks before any rank starts
        launch(saved[0], 2, quiet=True, checkpoints=checkpoints, resume=True)
    text = str(err.value)
    assert "train.optimizer.lr: 0.002 in the checkpoint, 0.003 in this run" in text
    assert "routing.groups.top: 3 in the checkpoint, 2 in this run" in text
    assert latest(checkpoints).name == "step-000001"  # nothing ran


def test_resume_refuses_another_model(saved):
    spec = resolved(load_spec(SPECS / "small-moe.yaml"))
    with pytest.raises(RunError, match=r"a checkpoint of tiny-moe, not of small-moe(.|\n)*model\.d_model: 128 in "
                                       r"the checkpoint"):
        check_resume(saved[1], spec)


def test_resume_accepts_a_pure_layout_change(saved):
    other = [*SMALL, *DP2_EP2_TP2_ZERO3_SP, "model.n_layers=2"]
    assert check_resume(saved[1], resolved(load_spec(SPECS / "tiny-moe.yaml", other))) == saved[1] / "step-000001"


@pytest.mark.parametrize("edit, message", [
    (lambda data: data.update(schema="lcc.checkpoint/0"), "checkpoint format 'lcc.checkpoint/0'; this lcc reads"),
    (lambda data: data.update(schema="lcc.checkpoint/1"), "checkpoint format 'lcc.checkpoint/1'; this lcc reads "
                                                          "'lcc.checkpoint/2' (saved by an earlier lcc, without"),
    (None, "not an lcc checkpoint (lcc-checkpoint.json is missing)"),
])
def test_resume_refuses_a_checkpoint_it_cannot_identify(saved, tmp_path, edit, message):
    checkpoints = _copy(saved, tmp_path, edit)
    if edit is None:
        (checkpoints / "step-000001" / IDENTITY).unlink()
    with pytest.raises(RunError) as err:
        check_resume(checkpoints, json.loads((saved[0] / "spec.json").read_text()))
    assert message in str(err.value) and str(checkpoints / "step-000001") in str(err.value)


# ------------------------------------------------------------------------------- lcc checkpoint info
def _info(*args):
    from typer.testing import CliRunner

    from lcc.cli import app

    return CliRunner().invoke(app, ["checkpoint", "info", *map(str, args)])


def test_checkpoint_info(saved):
    plan, checkpoints = saved
    n_params = len(json.loads((plan / "plan.json").read_text())["parameters"])
    out = _info(checkpoints, "--tensors")
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert lines[0] == f"{checkpoints / 'step-000001'}: tiny-moe, 1 optimizer step taken"
    assert "saved under: world 1 = pp 1 x dp 1 x tp 1; ep 1 (edp 1); ZeRO-0; sequence parallel off" in out.stdout
    assert any(line.split()[:3] == ["model", str(n_params), "tensors"] for line in lines)
    assert any(line.split()[:3] == ["optim", str(3 * n_params), "tensors"] for line in lines)
    assert any(line.split()[:3] == ["model/embed.weight", "256x128", "float64"] for line in lines)
    data = json.loads(_info(checkpoints / "step-000001", "--json").stdout)
    assert data["step"] == 1 and data["spec_name"] == "tiny-moe" and data["layout"]["world_size"] == 1
    assert data["holds"]["model"]["tensors"] == n_params and data["holds"]["bias"]["tensors"] == 2
    assert data["holds"]["meta"]["tensors"] == 2 and "tensors" not in data


def test_checkpoint_info_refuses_what_is_not_a_checkpoint(saved, tmp_path):
    for path, why in [(tmp_path / "missing", "no such file or directory"),
                      (saved[0], "not an lcc checkpoint (lcc-checkpoint.json is missing)")]:
        out = _info(path)
        assert out.exit_code == 2
        assert out.stderr == f"lcc checkpoint info: {path}: {why}\n"
        assert out.stdout == ""


def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path):
    (tmp_path / "step-000002").mkdir()
    (tmp_path / "latest").write_text("step-000002\n")
    (tmp_path / "step-000004.tmp").mkdir()  # a save that crashed before its rename
    assert latest(tmp_path) == tmp_path / "step-000002"
    assert latest(tmp_path / "missing") is None


# ------------------------------------------------------------------------------ checkpoints you can trust
def _data_file(checkpoints, step=1):
    """The largest file DCP wrote into a checkpoint: the tensors."""
    folder = checkpoints / f"step-{step:06d}"
    files = json.loads((folder / IDENTITY).read_text())["files"]
    return folder / max(files, key=lambda name: files[name]["bytes"])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize("damage, why", [(_flip, "corrupt: its sha256 differs from the one recorded when it was saved"),
                                         (_truncate, "truncated: "), (os.remove, "missing")])
def test_resume_refuses_a_damaged_file_naming_it(saved, tmp_path, damage, why):
    checkpoints = _copy(saved, tmp_path)
    data = _data_file(checkpoints)
    damage(data)
    with pytest.raises(RunError) as err:  # before any rank starts
        launch(saved[0], 2, quiet=True, checkpoints=checkpoints, resume=True)
    assert str(err.value).startswith(f"{data}: {why}")
    assert "--fallback" not in str(err.value)  # no older checkpoint to fall back to


def test_resume_refuses_a_dangling_latest(saved, tmp_path):
    checkpoints = _copy(saved, tmp_path)
    (checkpoints / "latest").write_text("step-000007\n")
    with pytest.raises(RunError, match=r"latest: names 'step-000007', which is missing\n  \(--fallback resumes from "
                                       r"the newest older checkpoint that passes this check: step-000001"):
        launch(saved[0], 8, quiet=True, checkpoints=checkpoints, resume=True)


@pytest.mark.parametrize("name", ["../elsewhere/step-000001", "/elsewhere/step-000001", "..", "step-000001/../..",
                                  "step-1.tmp"])
def test_latest_can_only_name_a_checkpoint_folder_beside_it(tmp_path, name):
    """`latest` is joined to its directory: a name that leads out of it (or is not a checkpoint folder's) is
    an error naming the pointer, wherever the path would lead, and the same for every reader."""
    from lcc.runtime.checkpoint_dir import resolve

    (tmp_path / "elsewhere" / "step-000001").mkdir(parents=True)  # a checkpoint folder it could reach
    checkpoints = tmp_path / "ckpt"
    (checkpoints / "step-000001").mkdir(parents=True)
    (checkpoints / "latest").write_text(name + "\n")
    message = re.escape(f"{checkpoints / 'latest'}: names {name!r}, which is not a checkpoint folder of {checkpoints}")
    for read in (latest, resolve, lambda d: check_resume(d, {})):
        with pytest.raises(CheckpointError, match=message):
            read(checkpoints)


def test_a_latest_that_leads_elsewhere_is_refused_or_passed_over(saved, tmp_path, capsys):
    checkpoints = _copy(saved, tmp_path)
    (checkpoints / "latest").write_text("../ckpt/step-000001\n")  # leads back in, but is no name lcc writes
    with pytest.raises(LaunchRefused, match=r"latest: names '../ckpt/step-000001', which is not a checkpoint folder "
                                            r"(.|\n)*--fallback resumes from the newest older checkpoint that passes "
                                            r"this check: step-000001"):
        launch(saved[0], 1, quiet=True, checkpoints=checkpoints, resume=True)
    launch(saved[0], 1, checkpoints=checkpoints, resume=True, fallback=True)
    out = capsys.readouterr()
    assert f"resuming from {checkpoints / 'step-000001'} instead (--fallback)" in out.err
    assert "nothing to run" in out.out  # step 1 is taken


def test_resume_without_a_checkpoint_is_an_error(saved, tmp_path):
    mistyped = tmp_path / "ckpt-typo"
    with pytest.raises(RunError, match=f"^{mistyped}: no checkpoint to resume from \\(no such directory\\)"):
        launch(saved[0], 1, quiet=True, checkpoints=mistyped, resume=True)
    assert not mistyped.exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match=r"empty: no checkpoint to resume from \(no latest file in it\); "
                                       r"--resume-if-any starts at step 0"):
        launch(saved[0], 1, quiet=True, checkpoints=tmp_path / "empty", resume=True)


@pytest.fixture(scope="module")
def every_step(saved):
    """The saved run's plan, saving after every step (not part of what a resume compares)."""
    plan = saved[0].parent / "plan-every-step"
    write(compile_plan(load_spec(SPECS / "tiny-moe.yaml", [*SMALL, *WORLD1, "train.checkpoint_every=1"])), plan)
    return plan


def test_resume_if_any_starts_fresh_then_continues_keeping_the_newest(every_step, tmp_path):
    checkpoints, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    launch(every_step, 3, metrics, quiet=True, checkpoints=checkpoints, resume_if_any=True, keep=2)
    assert sorted(p.name for p in checkpoints.iterdir()) == [".lock", "latest", "step-000002", "step-000003"]
    launch(every_step, 4, metrics, quiet=True, checkpoints=checkpoints, resume_if_any=True, keep=2)
    assert [m["step"] for m in read_metrics(metrics)] == [1, 2, 3, 4]  # the second run went on after step 3
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-000003", "step-000004"]


def test_prune_keeps_the_newest_up_to_the_step_saved(tmp_path):
    for name in ["step-000001", "step-000002", "step-000003", "step-000004.tmp", "step-000009"]:
        (tmp_path / name).mkdir()
    assert prune(tmp_path, 0, 3) == []  # 0 keeps all
    assert prune(tmp_path, 2, 3) == [tmp_path / "step-000001"]
    # step 9 is of a run that went further before this one resumed from an earlier checkpoint: a save replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000003", "step-000004.tmp",
                                                          "step-000009"]


def test_fallback_resumes_from_the_previous_checkpoint(saved, tmp_path, capsys):
    checkpoints = _copy(saved, tmp_path)
    shutil.copytree(checkpoints / "step-000001", checkpoints / "step-000002")
    (checkpoints / "latest").write_text("step-000002\n")
    _flip(_data_file(checkpoints, 2))
    with pytest.raises(RunError, match=r"corrupt(.|\n)*--fallback resumes from the newest older checkpoint that "
                                       r"passes this check: step-000001 is the newest older one"):
        launch(saved[0], 2, quiet=True, checkpoints=checkpoints, resume=True)
    metrics = tmp_path / "m.jsonl"
    launch(saved[0], 2, metrics, quiet=True, checkpoints=checkpoints, resume=True, fallback=True)
    err = capsys.readouterr().err
    assert f"{_data_file(checkpoints, 2)}: corrupt" in err
    assert f"resuming from {checkpoints / 'step-000001'} instead (--fallback)" in err
    assert [m["step"] for m in read_metrics(metrics)] == [2]
    assert latest(checkpoints).name == "step-000002"
    verify(checkpoints / "step-000002")  # saved again, over the corrupt one


def test_a_partial_save_is_removed_on_the_next_start(saved, tmp_path, capsys):
    checkpoints = _copy(saved, tmp_path)
    (checkpoints / "step-000002.tmp").mkdir()
    (checkpoints / "step-000002.tmp" / "__0_0.distcp").write_bytes(b"half")
    (checkpoints / "latest.tmp").write_text("step-000002\n")
    launch(saved[0], 1, quiet=True, checkpoints=checkpoints, resume=True)  # resumes at step 1: nothing to run
    assert sorted(p.name for p in checkpoints.iterdir()) == [".lock", "latest", "step-000001"]
    assert f"removed {checkpoints / 'step-000002.tmp'} (an interrupted save)" in capsys.readouterr().err


def test_a_second_run_on_a_locked_directory_is_refused(saved, tmp_path):
    from typer.testing import CliRunner

    from lcc.cli import app

    checkpoints = _copy(saved, tmp_path)
    with locked(checkpoints):  # as a run in another process holds it
        out = CliRunner().invoke(app, ["run", "train", str(saved[0]), "--checkpoint-dir", str(checkpoints),
                                       "--resume", "--steps", "1"])
    assert out.exit_code == 2, out.output  # refused before any rank starts
    assert out.stderr.startswith(f"lcc run train: {checkpoints} is in use by pid {os.getpid()} (started ")
    with locked(checkpoints):  # released with the run that held it
        pass


@pytest.mark.parametrize("args, message", [
    (["--resume", "--resume-if-any"], "--resume and --resume-if-any exclude each other"),
    (["--fallback"], "--fallback applies with --resume or --resume-if-any"),
    (["--resume-if-any"], "--resume-if-any needs --checkpoint-dir"),
])
def test_resume_options_are_checked(saved, args, message):
    from typer.testing import CliRunner

    from lcc.cli import app

    out = CliRunner().invoke(app, ["run", "train", str(saved[0]), *args])
    assert out.exit_code == 2 and out.stderr == message + "\n"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_non_finite_loss_stops_every_rank(tmp_path):
    """dp 2: both ranks see the reduced loss and stop after the same step; the checkpoint of step 1, which
    both wrote, lists and checks each rank's file."""
    plan = tmp_path / "plan"
    # in float32 a learning rate of 1e12 makes step 2's activations overflow
    write(compile_plan(load_spec(SPECS / "tiny-moe.yaml", [
        *SMALL, *WORLD1, "parallelism.dp=2", "cluster.gpus_per_node=2", "train.dtype=float32",
        "train.optimizer.warmup_steps=0", "train.optimizer.lr=1e12", "train.checkpoint_every=1"])), plan)
    checkpoints = tmp_path / "ckpt"
    with pytest.raises(RunError) as err:
        launch(plan, 4, tmp_path / "m.jsonl", quiet=True, checkpoints=checkpoints)
    assert f"loss is nan at step 2; last good checkpoint: {checkpoints / 'step-000001'}" in str(err.value)
    assert [m["step"] for m in read_metrics(tmp_path / "m.jsonl")] == [1, 2]  # the bad step's record is written
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-000001"]  # and it is not saved
    assert sorted(json.loads((checkpoints / "step-000001" / IDENTITY).read_text())["files"]) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]
    verify(checkpoints / "step-000001")


def test_a_failed_save_leaves_the_previous_checkpoint(saved, tmp_path, monkeypatch):
    import torch.distributed.checkpoint.filesystem as dcp_files

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(dcp_files, "_write_item", full)
    checkpoints = _copy(saved, tmp_path)
    with pytest.raises(RunError, match=r"step-000002.tmp: saving the checkpoint of step 2 failed \(.*latest still "
                                       r"names step-000001\):\n  rank 0: OSError: \[Errno 28\] No space left"):
        launch(saved[0], 2, quiet=True, checkpoints=checkpoints, resume=True)
    assert latest(checkpoints).name == "step-000001"
    verify(checkpoints / "step-000001")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_full_disk_leaves_the_previous_checkpoint(saved, tmp_path):
    """On a tmpfs with room for one checkpoint, mounted in a mount namespace of its own (unshare)."""
    mount = tmp_path / "small"
    mount.mkdir()
    probe = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", f"mount -t tmpfs tmpfs {mount}"]
    try:
        subprocess.run(probe, check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a small tmpfs here ({type(exc).__name__}): needs unshare and user namespaces")
    size = sum(p.stat().st_size for p in saved[1].rglob("*") if p.is_file())
    script = (f"mount -t tmpfs -o size={size * 3 // 2} tmpfs {mount} && cp -r {saved[1]}/. {mount} && "
              f"{sys.executable} -m lcc.cli run train {saved[0]} --checkpoint-dir {mount} --resume --steps 2; "
              f"echo rc=$?; cat {mount}/latest; diff -r {saved[1]}/step-000001 {mount}/step-000001 && echo intact")
    out = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ROOT,
                         capture_output=True, text=True, timeout=100)
    assert "lcc run train: " in out.stderr and "No space left on device" in out.stderr, out.stderr
    assert out.stdout.split()[-3:] == ["rc=1", "step-000001", "intact"], out.stdout  # after the progress line


def test_a_resumed_run_says_from_where_and_how_it_ended(saved, tmp_path, capfd):
    plan, source = saved
    checkpoints = tmp_path / "ckpt"
    shutil.copytree(source, checkpoints)
    launch(plan, 1, checkpoints=checkpoints, resume=True)  # the checkpoint has taken 1 step already
    out = capfd.readouterr().out
    assert f"resuming from step 1 ({checkpoints / 'step-000001'})" in out
    assert f"nothing to run: {checkpoints / 'step-000001'} has taken 1 step, and --steps is 1" in out
    launch(plan, 2, tmp_path / "m.jsonl", checkpoints=checkpoints, resume=True)
    out = capfd.readouterr().out
    assert "step 2/2  loss " in out
    loss = read_metrics(tmp_path / "m.jsonl")[-1]["loss"]
    assert re.search(rf"done: steps 2-2 of 2, [\d,]+ tokens in [\d.]+ s \([\d,]+ tokens/s\), final loss {loss:.4f}; "
                     rf"checkpoint: {re.escape(str(checkpoints / 'step-000002'))}", out), out


def test_serving_takes_a_checkpoint_of_the_same_model_only(saved):
    """lcc run generate --checkpoint: any layout and training settings, but the same model and routing."""
    spec = json.loads((saved[0] / "spec.json").read_text())
    other_layout = {**spec, "parallelism": {**spec["parallelism"], "tp": 2},
                    "train": {**spec["train"], "steps": 7}, "routing": {**spec["routing"], "capacity_factor": 1.5}}
    folder, _ = check_checkpoint(saved[1], other_layout)
    assert folder.name == "step-000001"
    other_model = {**spec, "model": {**spec["model"], "d_model": 64}}
    with pytest.raises(CheckpointError, match="another model: model.d_model is 128 there, 64 in the spec"):
        check_checkpoint(saved[1], other_model)


def test_a_checkpoint_from_before_node_limited_routing_is_the_same_model():
    """Its spec has no routing.groups.sets / max_sets: equal to the defaults (no node limit), not to a limit."""
    saved = {"model": {"d_model": 8}, "routing": {"groups": {"top": 2, "temperature": 0.1}}}
    unlimited = {"model": {"d_model": 8}, "routing": {"groups": {"top": 2, "temperature": 0.1, "sets": 1,
                                                                 "max_sets": None}}}
    limited = {"model": {"d_model": 8}, "routing": {"groups": {"top": 2, "temperature": 0.1, "sets": 2,
                                                               "max_sets": 1}}}
    assert spec_differences(saved, unlimited) == [] and spec_hash(saved) == spec_hash(unlimited)
    assert [d[0] for d in spec_differences(saved, limited)] == ["routing.groups.max_sets", "routing.groups.sets"]
    assert spec_hash(saved) != spec_hash(limited)
