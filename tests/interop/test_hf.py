"""Hugging Face models in and out of lcc, against transformers itself: logits in float32, step-1 loss and
gradients of a compiled plan in float64, greedy generation through `lcc run generate`, export and re-import
bit for bit, both expert layouts, tokenizers, and refused configs."""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from lcc.cli import app
from lcc.compiler.output import write
from lcc.compiler.plan import compile_plan
from lcc.data.stream import TokenStream, corpus_tokens, split_corpus
from lcc.interop import hf_weights
from lcc.model import build_model
from lcc.runtime.launch import launch, read_metrics
from lcc.spec import load_spec
from tests.conftest import cpu_kernels_here
from tests.interop.hf_models import FAMILIES, float64_throughout, lcc_view, save_model
from tests.runtime.equivalence import assert_rank_grads

transformers = pytest.importorskip("transformers")

# one multi-rank layout per family: tensor parallel (the qk norms under tp), pipeline
MULTI = {
    "qwen3_moe": ["parallelism.tp=2", "parallelism.ep=2", "cluster.gpus_per_node=2"],
    "mixtral": ["parallelism.pp=2", "parallelism.pipeline.microbatches=2", "cluster.gpus_per_node=2"],
    "olmoe": ["parallelism.tp=2", "parallelism.ep=2", "cluster.gpus_per_node=2"],  # the norm over all heads, under tp
}
SHORT = ["train.seq_len=48", "train.global_batch=4"]
CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"


def cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output + (str(result.exception) if result.exit_code not in (0, 2) else "")


class Imported:
    def __init__(self, family: str, base: Path):
        self.family = family
        self.hf_dir = base / f"hf-{family}"
        self.model = save_model(family, self.hf_dir)
        (self.hf_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)  # as transformers 5 saves one
        (self.hf_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
        self.spec_path = base / f"{family}.yaml"
        self.ckpt = base / f"{family}-ckpt"
        code, out = cli("import", "hf", self.hf_dir, "--out", self.spec_path)
        assert code == 0, out
        code, out = cli("checkpoint", "import-hf", self.hf_dir, "--spec", self.spec_path, "--out", self.ckpt)
        assert code == 0, out

    def spec(self, *overrides: str):
        return load_spec(self.spec_path, list(overrides))

    def hf(self, dtype: torch.dtype) -> torch.nn.Module:
        # the experts' plain loop (its grouped matmul takes no float64)
        model = transformers.AutoModelForCausalLM.from_pretrained(self.hf_dir, dtype=dtype,
                                                                  experts_implementation="eager").eval()
        if dtype == torch.float64:  # the rotary frequencies are a float32 buffer: the same formula in float64
            for module in model.modules():
                if hasattr(module, "inv_freq"):
                    dim = module.inv_freq.numel() * 2
                    theta = model.config.rope_parameters["rope_theta"]
                    module.inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        return model


@pytest.fixture(scope="module", params=FAMILIES)
def imported(request, tmp_path_factory) -> Imported:
    return Imported(request.param, tmp_path_factory.mktemp(request.param))


def lcc_reference(spec, ckpt: Path, dtype: torch.dtype) -> torch.nn.Module:
    """lcc's reference model with the checkpoint's weights, read with DCP directly."""
    model = build_model(spec, dtype=dtype)
    state = {f"model/{n}": p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state[f"model/{n}"])
    return model.eval()


def test_spec_of_each_family(imported):
    spec = imported.spec()
    att, routing = spec.model.attention, spec.routing
    assert att.qk_norm == {"mixtral": "none", "qwen3_moe": "head", "olmoe": "all"}[imported.family]
    assert (routing.k.min, routing.k.max) == (imported.model.config.num_experts_per_tok,) * 2
    assert routing.renormalize == (imported.family != "olmoe")
    assert spec.model.moe.n_groups == 1 and routing.experts.selection == "top_score"
    assert spec.model.tokenizer == f"hf-{imported.family}/tokenizer.json"
    assert "router auxiliary loss" in imported.spec_path.read_text()
    # the end-of-sequence id: Mixtral's 2; Qwen3-MoE's config has none; OLMoE's 50279 is outside the vocabulary
    assert spec.serve.stop_token_ids == {"mixtral": [2], "qwen3_moe": [], "olmoe": []}[imported.family]
    if imported.family == "olmoe":
        assert "eos_token_id 50279 is outside the vocabulary of 128" in imported.spec_path.read_text()
    if imported.family == "qwen3_moe":
        assert spec.model.moe_layers == (0, 2) and spec.model.ffn.d_ff == 48


def test_logits_equal_transformers_float32(imported):
    tokens = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = imported.hf(torch.float32)(tokens).logits
        mine = lcc_reference(imported.spec(), imported.ckpt, torch.float32)(tokens)
    assert (mine - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def _hf_step_one(imported: Imported, spec, monkeypatch) -> tuple[float, dict[str, torch.Tensor]]:
    """transformers' cross-entropy and gradients (lcc's names) on the batch lcc's first step trains on."""
    float64_throughout(monkeypatch)
    model = imported.hf(torch.float64)
    train, _ = split_corpus(corpus_tokens(spec))
    batch = TokenStream(train, spec.train.seq_len).sequences(0, spec.train.global_batch)
    logits = model(batch[:, :-1]).logits
    loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    loss.backward()
    grads = lcc_view(model, imported.family, {n: p.grad for n, p in model.named_parameters()})
    return float(loss.detach()), grads


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", ["world1", "multi"])
def test_step_one_equals_transformers_float64(imported, layout, tmp_path, monkeypatch):
    spec = imported.spec("train.dtype=float64", *SHORT, *(MULTI[imported.family] if layout == "multi" else []))
    plan_dir = tmp_path / "plan"
    write(compile_plan(spec), plan_dir)
    monkeypatch.setenv("LCC_DUMP_GRADS", str(tmp_path))
    launch(plan_dir, 1, tmp_path / "metrics.jsonl", quiet=True, init_from=imported.ckpt,
           checkpoints=tmp_path / "run" if layout == "world1" else None)
    if layout == "world1":  # the trained checkpoint keeps the model's files: exported without --tokenizer
        code, text = cli("checkpoint", "export-hf", tmp_path / "run", "--out", tmp_path / "exported")
        assert code == 0 and "give --tokenizer" not in text, text
        for name in ("tokenizer.json", "chat_template.jinja", "tokenizer_config.json", "generation_config.json"):
            assert (tmp_path / "exported" / name).read_bytes() == (imported.hf_dir / name).read_bytes() or \
                json.loads((tmp_path / "exported" / name).read_text()) == \
                json.loads((imported.hf_dir / name).read_text()), name
    loss, grads = _hf_step_one(imported, spec, monkeypatch)
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["loss"] == pytest.approx(loss, rel=1e-11, abs=0)
    for name in [n for n, _ in build_model(spec, device="meta").named_parameters() if "centroids" in n]:
        grads[name] = torch.zeros(1, spec.model.d_model, dtype=torch.float64)  # lcc's own, unused by one group
    assert_rank_grads(spec, plan_dir, tmp_path, grads)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_greedy_generation_equals_transformers_float64(imported, monkeypatch):
    """Served on the family's multi-rank layout (tp 2 or pp 2), both prompts batched together."""
    prompts = [[5, 17, 90, 3], [64, 2, 2, 2, 9, 100, 41, 77, 12]]
    ids = [a for p in prompts for a in ("--prompt-ids", ",".join(map(str, p)))]
    layout = [a for o in MULTI[imported.family] for a in ("--set", o)]
    code, out = cli("run", "generate", imported.spec_path, "--checkpoint", imported.ckpt, "--max-tokens", 32, "--json",
                    "--set", "serve.dtype=float64", "--set", "serve.stop_token_ids=[]", *layout, *ids)
    assert code == 0, out
    mine = [json.loads(line)["token_ids"] for line in out.splitlines() if line.startswith("{")]
    float64_throughout(monkeypatch)
    model = imported.hf(torch.float64)
    model.generation_config.eos_token_id = None  # 32 tokens, as lcc generates them
    for prompt, tokens in zip(prompts, mine, strict=True):
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=0)
        assert tokens == theirs[0, len(prompt):].tolist()


def test_generation_stops_at_the_models_end_token(imported, monkeypatch):
    """With the model's end-of-sequence id (serve.stop_token_ids, imported from the config), generation ends
    where transformers' does, the end token included."""
    prompt = [64, 2, 2, 2, 9, 100, 41, 77, 12]
    float64 = ["--set", "serve.dtype=float64", "--set", "serve.stop_token_ids=[]"]
    code, out = cli("run", "generate", imported.spec_path, "--checkpoint", imported.ckpt, "--max-tokens", 12, "--json",
                    *float64, "--prompt-ids", ",".join(map(str, prompt)))
    assert code == 0, out
    free = json.loads(next(line for line in out.splitlines() if line.startswith("{")))["token_ids"]
    end = free[6]
    code, out = cli("run", "generate", imported.spec_path, "--checkpoint", imported.ckpt, "--max-tokens", 12, "--json",
                    *float64[:2], "--set", f"serve.stop_token_ids=[{end}]", "--prompt-ids", ",".join(map(str, prompt)))
    result = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert result["finish_reason"] == "stop" and result["token_ids"] == free[:free.index(end) + 1]
    float64_throughout(monkeypatch)
    theirs = imported.hf(torch.float64).generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                                 eos_token_id=end, pad_token_id=0)
    assert result["token_ids"] == theirs[0, len(prompt):].tolist()


def test_generate_text_through_the_models_tokenizer(imported):
    code, out = cli("run", "generate", imported.spec_path, "--checkpoint", imported.ckpt, "--prompt",
                    "The teacher said", "--max-tokens", 6, "--json", *cpu_kernels_here())
    assert code == 0, out
    result = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(imported.hf_dir / "tokenizer.json"))
    assert result["text"] == tok.decode(result["token_ids"], skip_special_tokens=True)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})  # noqa: SIM118 - not iterable
    return out


def _lcc_tensors(ckpt: Path, spec) -> dict[str, torch.Tensor]:
    model = build_model(spec, device="meta")
    state = {f"model/{n}": torch.empty(tuple(p.shape)) for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    return state


def test_export_then_import_is_bitwise_identical(imported, tmp_path):
    out = tmp_path / "exported"
    # two shards of several layers each
    code, text = cli("checkpoint", "export-hf", imported.ckpt, "--out", out, "--max-shard-gib", 0.0004)
    assert code == 0, text
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    original, exported = _tensors(imported.hf_dir), _tensors(out)
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)
    again = tmp_path / "again"
    code, text = cli("checkpoint", "import-hf", out, "--spec", imported.spec_path, "--out", again)
    assert code == 0, text
    first, second = _lcc_tensors(imported.ckpt, imported.spec()), _lcc_tensors(again, imported.spec())
    assert all(torch.equal(first[k], second[k]) for k in first)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)  # transformers loads it back, the same model
    assert type(reloaded) is type(imported.model)
    theirs, again = imported.model.state_dict(), reloaded.state_dict()
    assert theirs.keys() == again.keys() and all(torch.equal(theirs[k], again[k]) for k in theirs)


def test_export_then_import_then_export_writes_the_same_files(imported, tmp_path):
    """What was imported is written back: the end-of-sequence ids, the generation config, the tokenizer, its
    chat template and the original config's own values; and an export imported again exports the same bytes."""
    first, second = tmp_path / "first", tmp_path / "second"
    code, text = cli("checkpoint", "export-hf", imported.ckpt, "--out", first)
    assert code == 0 and "give --tokenizer" not in text, text
    files = {p.name: p.read_bytes() for p in first.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja",
            "tokenizer_config.json"} <= files.keys()
    theirs, ours = (json.loads((d / "config.json").read_text()) for d in (imported.hf_dir, first))
    for key in ("eos_token_id", "bos_token_id", "pad_token_id", "router_aux_loss_coef", "initializer_range"):
        assert ours.get(key) == theirs.get(key), key
    assert json.loads(files["generation_config.json"]) == json.loads((imported.hf_dir / "generation_config.json"
                                                                      ).read_text())
    assert files["chat_template.jinja"].decode() == CHAT_TEMPLATE
    assert files["tokenizer.json"] == (imported.hf_dir / "tokenizer.json").read_bytes()
    spec = tmp_path / "again.yaml"
    code, text = cli("import", "hf", first, "--out", spec)
    assert code == 0, text
    assert load_spec(spec).serve.stop_token_ids == imported.spec().serve.stop_token_ids
    code, text = cli("checkpoint", "import-hf", first, "--spec", spec, "--out", tmp_path / "ckpt")
    assert code == 0, text
    code, text = cli("checkpoint", "export-hf", tmp_path / "ckpt", "--out", second)
    assert code == 0, text
    assert {p.name: p.read_bytes() for p in second.iterdir()} == files


def test_fused_expert_stacks_import_as_per_expert_tensors(imported, tmp_path):
    """transformers 5 holds experts as gate_up_proj / down_proj stacks: the same weights either way."""
    fused = tmp_path / "fused"
    fused.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(imported.hf_dir / name, fused / name)
    save_file({n: p.detach().contiguous() for n, p in imported.model.state_dict().items()},
              str(fused / "model.safetensors"), metadata={"format": "pt"})
    ckpt = tmp_path / "ckpt"
    code, out = cli("checkpoint", "import-hf", fused, "--spec", imported.spec_path, "--out", ckpt)
    assert code == 0, out
    first, second = _lcc_tensors(imported.ckpt, imported.spec()), _lcc_tensors(ckpt, imported.spec())
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_import_the_weights_of_another_model_is_refused(imported, tmp_path):
    spec = tmp_path / "other.yaml"
    spec.write_text(imported.spec_path.read_text().replace("d_model: 64", "d_model: 32"))
    code, out = cli("checkpoint", "import-hf", imported.hf_dir, "--spec", spec, "--out", tmp_path / "ckpt")
    assert code == 2 and "model.d_model is 32" in out and "config.json makes it 64" in out


REFUSED = [
    ({"sliding_window": 4096}, "sliding_window = 4096"),
    ({"model_type": "deepseek_v3", "kv_lora_rank": 512}, "kv_lora_rank = 512: multi-head latent attention"),
    ({"model_type": "deepseek_v3", "topk_group": 4}, "topk_group = 4: group-limited routing"),
    ({"model_type": "qwen2_moe", "shared_expert_intermediate_size": 64}, "shared_expert_intermediate_size = 64"),
    ({"model_type": "llama"}, 'model_type = "llama": supported families: mixtral, qwen3_moe, olmoe'),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
    ({"hidden_act": "gelu"}, 'hidden_act = "gelu"'),
    ({"dtype": "float16"}, 'dtype = "float16"'),
    ({"router_jitter_noise": 0.1}, "router_jitter_noise = 0.1"),
]


@pytest.mark.parametrize("change,message", REFUSED, ids=[m.split(" ")[0] for _, m in REFUSED])
def test_what_lcc_cannot_represent_is_refused_with_the_field_named(tmp_path, change, message):
    config = {"model_type": "mixtral", "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
              "intermediate_size": 32, "max_position_embeddings": 256, "dtype": "float32", **change}
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, out = cli("import", "hf", tmp_path, "--out", tmp_path / "spec.yaml")
    assert code == 2 and message in out and str(tmp_path / "config.json") in out
    assert not (tmp_path / "spec.yaml").exists()


def test_gpus_layout_validates_and_fits(tmp_path):
    config = {"model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 48,
              "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
              "num_experts_per_tok": 8, "moe_intermediate_size": 768, "intermediate_size": 6144,
              "max_position_embeddings": 40960, "norm_topk_prob": True, "dtype": "bfloat16",
              "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}  # Qwen3-30B-A3B's shape
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, out = cli("import", "hf", tmp_path, "--out", tmp_path / "spec.yaml", "--gpus", 16)
    assert code == 0, out
    spec = load_spec(tmp_path / "spec.yaml")
    assert spec.parallelism.world_size == 16 and spec.cluster.device.kind == "cuda"
    from lcc.compiler.cost import cost_report

    assert cost_report(spec)["memory"]["fits"]


def test_a_tied_bfloat16_model_imports_and_exports(tmp_path):
    """tie_word_embeddings: one embedding, used by the LM head in lcc and in transformers; bfloat16 weights
    become float32 masters exactly, and go back to the same bfloat16 bits."""
    hf_dir = tmp_path / "tied"
    save_model("qwen3_moe", hf_dir, tie_word_embeddings=True).to(torch.bfloat16).save_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    spec_path, ckpt, out = tmp_path / "tied.yaml", tmp_path / "ckpt", tmp_path / "exported"
    for args in (("import", "hf", hf_dir, "--out", spec_path),
                 ("checkpoint", "import-hf", hf_dir, "--spec", spec_path, "--out", ckpt),
                 ("checkpoint", "export-hf", ckpt, "--out", out)):
        code, text = cli(*args)
        assert code == 0, text
    spec = load_spec(spec_path)
    assert spec.model.tie_embeddings and spec.train.dtype == "bfloat16" and spec.serve.dtype == "bfloat16"
    spec = load_spec(spec_path, ["train.dtype=float32"])  # the float32 reference of the same weights
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = model(tokens).logits
        mine = lcc_reference(spec, ckpt, torch.float32)(tokens)
    assert (mine - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    original, exported = _tensors(hf_dir), _tensors(out)
    assert original.keys() == exported.keys() and all(torch.equal(original[k], exported[k]) for k in original)


# ------------------------------------------------------------------------------------ files on disk
@contextlib.contextmanager
def disk_full_after(size: int):
    """Writes that would make any file longer than `size` bytes fail (EFBIG), as on a full disk."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the error, not the signal that would kill pytest
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)


ONE_FAMILY = pytest.mark.parametrize("imported", ["mixtral"], indirect=True)  # about files, not models


@ONE_FAMILY
@pytest.mark.parametrize("max_shard_gib,last", [(2.0, "config.json"), (0.0004, "model.safetensors.index.json")])
def test_an_export_cut_short_leaves_no_truncated_json(imported, tmp_path, monkeypatch, max_shard_gib, last):
    """The disk fills while config.json or the shards' index is written (the index first, when there is one):
    the file is absent, not truncated JSON that transformers would choke on, and the command says so."""
    out = tmp_path / "exported"
    monkeypatch.setattr(hf_weights, "write_safetensors", lambda path, tensors, metadata=None: path.touch())
    with disk_full_after(64):  # the shards (placeholders here) are written; the JSON files are longer than this
        code, text = cli("checkpoint", "export-hf", imported.ckpt, "--out", out, "--max-shard-gib", max_shard_gib)
    left = sorted(p.name for p in out.iterdir())
    assert last not in left and "config.json" not in left
    assert all(name.endswith(".safetensors") for name in left)  # no temporary file left either
    assert code == 1 and f"writing {out} failed: File too large" in text


@ONE_FAMILY
def test_import_leaves_a_folder_beside_its_output_alone(imported, tmp_path):
    """A folder named `<out>.tmp` is the user's: the import neither deletes nor uses it."""
    theirs = tmp_path / "ckpt.tmp"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    out = tmp_path / "ckpt"
    code, text = cli("checkpoint", "import-hf", imported.hf_dir, "--spec", imported.spec_path, "--out", out)
    assert code == 0, text
    assert (theirs / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ckpt.tmp"]
    first, second = _lcc_tensors(imported.ckpt, imported.spec()), _lcc_tensors(out, imported.spec())
    assert all(torch.equal(first[k], second[k]) for k in first)


@ONE_FAMILY
def test_an_import_cut_short_leaves_nothing_behind(imported, tmp_path):
    out = tmp_path / "ckpt"
    with disk_full_after(4096):  # the tensors' files are larger
        code, text = cli("checkpoint", "import-hf", imported.hf_dir, "--spec", imported.spec_path, "--out", out)
    assert code == 1 and f"{out}: writing the checkpoint failed:\n  rank 0: " in text
    assert list(tmp_path.iterdir()) == []


@ONE_FAMILY
def test_a_truncated_safetensors_file_is_refused_with_the_file_named(imported, tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(imported.hf_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    out = tmp_path / "ckpt"
    code, text = cli("checkpoint", "import-hf", folder, "--spec", imported.spec_path, "--out", out)
    assert code == 2 and f"{weights}: not a readable safetensors file" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@ONE_FAMILY
def test_fine_tuning_on_chat_records_trains_on_the_assistant_turns_alone(imported, tmp_path, monkeypatch):
    """Chat records prepared with the model's template (lcc data prepare --chat) and trained from the imported
    weights: step 1's loss is transformers' per-token cross-entropy averaged over the assistant turns' tokens
    alone (float64), the other positions contributing nothing."""
    chats = [[{"role": "user", "content": f"where is the {w} number {i}?"},
              {"role": "assistant", "content": f"the {w} is near the river, {i} times"}]
             for i, w in enumerate(["cat", "dog", "ship", "bird"] * 8)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    data = tmp_path / "data"
    code, text = cli("data", "prepare", tmp_path / "chat.jsonl", "--spec", imported.spec_path, "--out", data, "--chat")
    assert code == 0, text
    spec = imported.spec("train.dtype=float64", *SHORT, "train.data.kind=prepared", f"train.data.path={data}")
    write(compile_plan(spec), tmp_path / "plan")
    launch(tmp_path / "plan", 1, tmp_path / "metrics.jsonl", quiet=True, init_from=imported.ckpt)
    loss = read_metrics(tmp_path / "metrics.jsonl")[0]["loss"]
    float64_throughout(monkeypatch)
    tokens = torch.from_numpy(np.fromfile(data / "tokens.bin", dtype="<i4").astype("int64"))
    mask = torch.from_numpy(np.fromfile(data / "loss_mask.bin", dtype=np.uint8).astype("int64"))
    L, B = spec.train.seq_len, spec.train.global_batch
    seqs = torch.stack([tokens[i * L:i * L + L + 1] for i in range(B)])
    trained = torch.stack([mask[i * L + 1:i * L + L + 1] for i in range(B)]).flatten().double()
    assert 0 < trained.sum() < trained.numel()  # both kinds of position in the batch
    with torch.no_grad():
        logits = imported.hf(torch.float64)(seqs[:, :-1]).logits
    per_token = F.cross_entropy(logits.flatten(0, 1), seqs[:, 1:].flatten(), reduction="none")
    assert loss == pytest.approx(float((per_token * trained).sum() / trained.sum()), rel=1e-9, abs=0)
