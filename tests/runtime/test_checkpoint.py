"""Checkpoints: layout-free keys, resuming under another layout, the identity check, `lcc checkpoint info`."""

from __future__ import annotations

import itertools
import json
import math
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp

from lcc.compiler.output import write
from lcc.compiler.plan import compile_plan
from lcc.plan.types import Parameter, Shard
from lcc.runtime.checkpoint import IDENTITY, SCHEMA, check_resume, describe, latest
from lcc.runtime.checkpoint_layout import Blocks, flat_boxes, local_blocks
from lcc.runtime.launch import launch, read_metrics
from lcc.runtime.support import RunError
from lcc.spec import load_spec, resolved
from tests.conftest import SPECS
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
    """tiny-moe trained 10 steps under dp 4 x ep 4 with ZeRO 2, saved, resumed to step 12 under the same
    layout (bitwise), under pp 2 x tp 2 and under dp 2 x ep 2 x tp 2 with ZeRO 3 and sequence parallelism
    (1e-8): the losses of an uninterrupted run."""
    layouts = {"same": DP4_EP4_ZERO2, "pp2_tp2": PP2_TP2, "zero3_sp": DP2_EP2_TP2_ZERO3_SP}
    plans = {}
    for name, layout in layouts.items():
        plans[name] = tmp_path / name
        # saving every 10 steps is not part of what a resume compares (train.checkpoint_every)
        write(compile_plan(load_spec(SPECS / "tiny-moe.yaml", [*SMALL, *layout, "train.checkpoint_every=10"])),
              plans[name])
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
        assert [m["step"] for m in records] == list(range(12))
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
