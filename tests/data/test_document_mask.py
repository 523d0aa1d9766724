"""`train.data.document_mask`: packed sequences whose attention stays inside each document compute what each
document computes on its own. The oracle runs the reference model on every document piece of the step's
sequences separately (float64); other layouts, with recomputation in backward, follow the same losses."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lcc.compiler.output import write
from lcc.compiler.plan import compile_plan
from lcc.data.prepare import Encoder, prepare
from lcc.model import build_model
from lcc.runtime.launch import launch, read_metrics
from lcc.spec import load_spec
from tests.conftest import SPECS
from tests.data.test_prepare import WORLD1, texts

OTHER = ["parallelism.pp=2", "parallelism.dp=1", "parallelism.tp=2", "parallelism.ep=1",
         "parallelism.pipeline.microbatches=2", "cluster.gpus_per_node=4", "parallelism.activation_checkpointing=full",
         "model.n_layers=2", "train.seq_len=32", "train.global_batch=4", "train.dtype=float64"]


def per_document_loss(spec, folder) -> float:
    """Step 1's loss from the reference model run on each document's piece of each sequence on its own: a
    piece's positions predict their next tokens (the last one, the next document's first)."""
    model = build_model(spec, dtype=torch.float64)
    tokens = torch.from_numpy(np.fromfile(folder / "tokens.bin", dtype="<i4").astype(np.int64))
    ends = np.fromfile(folder / "documents.bin", dtype="<i8")
    L, B = spec.train.seq_len, spec.train.global_batch
    total = 0.0
    with torch.no_grad():
        for i in range(B):
            first = i * L
            doc = np.searchsorted(ends, np.arange(first, first + L), side="right")
            for d in np.unique(doc):
                where = np.nonzero(doc == d)[0]
                a, b = first + where[0], first + where[-1] + 1
                logits = model(tokens[a:b].unsqueeze(0))[0]
                total += float(F.cross_entropy(logits, tokens[a + 1:b + 1], reduction="sum"))
    return total / (B * L)


@pytest.mark.slow
def test_attention_inside_documents_equals_each_document_on_its_own(tmp_path):
    rng = random.Random(3)
    docs = [t[:rng.randrange(3, 40)] for t in texts(60, 5)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    prepare([tmp_path / "d.jsonl"], Encoder(256, None, None, False, None), None, tmp_path / "data")
    data = ["train.data.kind=prepared", f"train.data.path={tmp_path / 'data'}", "train.data.document_mask=true",
            "routing.capacity_factor=null"]
    spec = load_spec(SPECS / "tiny-moe.yaml", [*WORLD1, *data])
    write(compile_plan(spec), tmp_path / "plan")
    assert "segments=ctx.segments" in (tmp_path / "plan" / "programs" / "stage0.py").read_text()
    launch(tmp_path / "plan", 2, tmp_path / "m.jsonl", quiet=True)
    losses = [r["loss"] for r in read_metrics(tmp_path / "m.jsonl")]
    assert losses[0] == pytest.approx(per_document_loss(spec, tmp_path / "data"), rel=1e-10, abs=0)
    unmasked = load_spec(SPECS / "tiny-moe.yaml", [*WORLD1, *data[:2], data[3]])
    write(compile_plan(unmasked), tmp_path / "plain")
    launch(tmp_path / "plain", 1, tmp_path / "plain.jsonl", quiet=True)
    assert read_metrics(tmp_path / "plain.jsonl")[0]["loss"] != pytest.approx(losses[0], rel=1e-6)
    # pp 2 x tp 2 with full recomputation: attention rerun in backward sees its own micro-batch's documents
    write(compile_plan(load_spec(SPECS / "tiny-moe.yaml", [*OTHER, *data])), tmp_path / "other")
    launch(tmp_path / "other", 2, tmp_path / "other.jsonl", quiet=True)
    assert [r["loss"] for r in read_metrics(tmp_path / "other.jsonl")] == pytest.approx(losses, rel=1e-8, abs=0)
