"""A transformers `config.json` of a supported MoE family as an lcc spec that computes the same model, and back.

Supported: Mixtral (`mixtral`), Qwen3-MoE (`qwen3_moe`) and OLMoE (`olmoe`). Their routing is a softmax over
all experts and the top k, renormalised or not: in lcc one group, `top_score` selection and a fixed k. What
lcc cannot compute exactly is refused with the config field named, never approximated (docs/interop.md).
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path
from typing import Any

FAMILIES = ("mixtral", "qwen3_moe", "olmoe")
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float64": "float64"}
# configs of families lcc cannot represent, told apart by a field of their own
UNREPRESENTABLE = (
    ("kv_lora_rank", "multi-head latent attention (MLA)"),
    ("q_lora_rank", "multi-head latent attention (MLA)"),
    ("shared_expert_intermediate_size", "a gated shared expert of its own width"),
    ("n_shared_experts", "shared experts"),
    ("topk_group", "group-limited routing"),
    ("scoring_func", "sigmoid or other non-softmax expert scores"),
)
# a CUDA cluster for --gpus: H100 SXM figures (dense bf16, HBM3, NVLink 4, 400 Gb/s InfiniBand per GPU)
H100 = {"kind": "cuda", "name": "H100-SXM-80GB", "memory_gib": 80, "peak_tflops": 989, "memory_tbps": 3.35}
H100_NETWORK = {"intra_node_gbps": 3600, "inter_node_gbps": 400}
CPU = {"kind": "cpu", "name": "cpu", "memory_gib": 16, "peak_tflops": 0.1, "memory_tbps": 0.02}
CPU_NETWORK = {"intra_node_gbps": 100, "inter_node_gbps": 25}


class ImportRefused(ValueError):
    """A config lcc cannot represent exactly, or cannot read; the message names the file and the field."""


def read_config(model_dir: Path) -> tuple[Path, dict[str, Any]]:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise ImportRefused(f"{model_dir}: not a folder (a Hugging Face model folder holds config.json)")
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ImportRefused(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ImportRefused(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ImportRefused(f"{path}: a config is a JSON object")
    return path, data


class _Config:
    """Field access that names the file and the field in every refusal."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path, self.data = path, data

    def refuse(self, field: str, why: str) -> ImportRefused:
        shown = json.dumps(self.data.get(field)) if field in self.data else "absent"
        return ImportRefused(f"{self.path}: {field} = {shown}: {why}")

    def get(self, field: str, default: Any = None) -> Any:
        return self.data.get(field, default)

    def int(self, *fields: str, default: int | None = None) -> int:
        for field in fields:
            value = self.data.get(field)
            if value is not None:
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise self.refuse(field, "expected a positive integer")
                return value
        if default is not None:
            return default
        raise ImportRefused(f"{self.path}: {fields[0]} is missing")


def _rope_theta(cfg: _Config) -> float:
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):  # transformers 5
        if params.get("rope_type", "default") != "default":
            raise cfg.refuse("rope_parameters", f"rope_type {params.get('rope_type')!r}: lcc's rotary embedding is "
                             "the default one (no scaling)")
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    else:  # transformers 4
        if cfg.get("rope_scaling") is not None:
            raise cfg.refuse("rope_scaling", "lcc's rotary embedding is the default one (no scaling)")
        theta = cfg.get("rope_theta", 10000.0)
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise cfg.refuse("rope_parameters" if isinstance(params, dict) else "rope_theta", "expected a positive base")
    return float(theta)


def _refusals(cfg: _Config, family: str) -> None:
    for field, what in UNREPRESENTABLE:
        if cfg.get(field) not in (None, 0, "softmax"):
            raise cfg.refuse(field, f"{what} cannot be represented in lcc")
    if cfg.get("hidden_act", "silu") != "silu":
        raise cfg.refuse("hidden_act", "lcc's experts and FFN are SwiGLU (silu)")
    if cfg.get("attention_bias"):
        raise cfg.refuse("attention_bias", "lcc's attention projections have no biases")
    if cfg.get("mlp_bias"):
        raise cfg.refuse("mlp_bias", "lcc's FFNs have no biases")
    if cfg.get("attention_dropout", 0.0):
        raise cfg.refuse("attention_dropout", "lcc trains without dropout")
    if family == "qwen3_moe" and cfg.get("use_sliding_window"):
        raise cfg.refuse("use_sliding_window", "sliding-window attention cannot be represented in lcc")
    if family == "mixtral" and cfg.get("sliding_window") is not None:
        raise cfg.refuse("sliding_window", "sliding-window attention cannot be represented in lcc")
    if cfg.get("router_jitter_noise", 0.0):
        raise cfg.refuse("router_jitter_noise", "lcc's router adds no noise in training")
    if cfg.get("clip_qkv") is not None:
        raise cfg.refuse("clip_qkv", "lcc does not clamp queries, keys and values")


def _dtype(cfg: _Config) -> str:
    field = "dtype" if "dtype" in cfg.data else "torch_dtype"
    value = cfg.get(field) or "float32"
    if value not in DTYPES:
        raise cfg.refuse(field, "lcc trains and serves float32, bfloat16 or float64 models")
    return DTYPES[value]


def model_sections(path: Path, data: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any], list[str]]:
    """(family, the spec's model section, its routing section, notes for the spec's header) of a config."""
    cfg = _Config(path, data)
    family = cfg.get("model_type")
    if family not in FAMILIES:
        for field, what in UNREPRESENTABLE:
            if cfg.get(field) not in (None, 0, "softmax"):
                raise cfg.refuse(field, f"{what} cannot be represented in lcc")
        raise cfg.refuse("model_type", f"supported families: {', '.join(FAMILIES)}")
    _refusals(cfg, family)
    d = cfg.int("hidden_size")
    n_heads = cfg.int("num_attention_heads")
    n_kv = cfg.int("num_key_value_heads", default=n_heads)
    head_dim = cfg.int("head_dim", default=d // n_heads)
    n_layers = cfg.int("num_hidden_layers")
    n_experts = cfg.int("num_local_experts", "num_experts")
    k = cfg.int("num_experts_per_tok")
    if k > n_experts:
        raise cfg.refuse("num_experts_per_tok", f"more experts per token than the {n_experts} experts")
    expert_d_ff = cfg.int("moe_intermediate_size" if family == "qwen3_moe" else "intermediate_size")
    moe_layers: str | list[int] = "all"
    ffn = None
    if family == "qwen3_moe":  # transformers: MoE unless listed in mlp_only_layers, every decoder_sparse_step-th
        step = cfg.int("decoder_sparse_step", default=1)
        dense_only = cfg.get("mlp_only_layers") or []
        if not isinstance(dense_only, list) or not all(isinstance(i, int) for i in dense_only):
            raise cfg.refuse("mlp_only_layers", "expected a list of layer indices")
        moe = [i for i in range(n_layers) if i not in dense_only and (i + 1) % step == 0]
        if not moe:
            raise cfg.refuse("mlp_only_layers", "no layer is MoE")
        if len(moe) < n_layers:
            moe_layers = moe
            ffn = {"d_ff": cfg.int("intermediate_size")}
    renormalize = True if family == "mixtral" else bool(cfg.get("norm_topk_prob", False))
    model: dict[str, Any] = {
        "vocab_size": cfg.int("vocab_size"),
        "d_model": d,
        "n_layers": n_layers,
        "max_seq_len": cfg.int("max_position_embeddings"),
        "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "tokenizer": None,
        "attention": {"n_heads": n_heads, "n_kv_heads": n_kv, "head_dim": head_dim, "rope_theta": _rope_theta(cfg),
                      "qk_norm": {"mixtral": "none", "qwen3_moe": "head", "olmoe": "all"}[family]},
        **({"ffn": ffn} if ffn else {}),
        "moe": {"layers": moe_layers, "n_experts": n_experts, "n_groups": 1, "expert_d_ff": expert_d_ff,
                "n_shared_experts": 0},
    }
    routing = {
        "score": "softmax",
        "groups": {"similarity": "cosine", "top": 1, "temperature": 1.0},
        "experts": {"selection": "top_score"},
        "k": {"min": k, "max": k, "threshold": 1.0},
        "gate_scale": 1.0,
        "renormalize": renormalize,
        "balance": {"bias_rate": 0.0, "aux_loss_coef": 0.0, "z_loss_coef": 0.0},
        "capacity_factor": None,
    }
    notes = [f"routing: a softmax over all {n_experts} experts, the top {k} "
             f"{'renormalised' if renormalize else 'as they are'} (one group, top_score, fixed k), as {family} routes."]
    aux = cfg.get("router_aux_loss_coef")
    if aux:
        notes.append(f"transformers' router auxiliary loss (router_aux_loss_coef {aux}, over all layers at once, "
                     "with output_router_logits) is left off: routing.balance.aux_loss_coef is 0.")
    return family, model, routing, notes


def stop_tokens(model_dir: Path, data: dict[str, Any], vocab: int) -> tuple[list[int], list[str]]:
    """The model's end-of-sequence ids (generation_config.json's, else config.json's eos_token_id), and notes
    on any left out (outside the vocabulary)."""
    value = data.get("eos_token_id")
    generation = Path(model_dir) / "generation_config.json"
    if generation.is_file():
        try:
            value = json.loads(generation.read_text()).get("eos_token_id", value)
        except (OSError, ValueError, AttributeError) as exc:
            raise ImportRefused(f"{generation}: unreadable ({exc})") from None
    ids = value if isinstance(value, list) else [value] if value is not None else []
    ids = [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]
    kept = sorted({i for i in ids if 0 <= i < vocab})
    notes = [f"eos_token_id {i} is outside the vocabulary of {vocab}: not a stop token." for i in ids if i not in kept]
    return kept, notes


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")
    return (slug or "imported")[:100]


def _cluster(gpus: int | None) -> dict[str, Any]:
    if gpus is None:
        return {"nodes": 1, "gpus_per_node": 1, "device": dict(CPU), "network": dict(CPU_NETWORK)}
    per_node = min(gpus, 8)
    return {"nodes": gpus // per_node, "gpus_per_node": per_node, "device": dict(H100), "network": dict(H100_NETWORK)}


def _layouts(gpus: int, n_experts: int) -> list[dict[str, Any]]:
    """Layouts of `gpus` devices in the order tried: the least tensor and pipeline splitting first, experts
    spread as widely as they divide, then ZeRO-3 and full recomputation before more splitting."""
    per_node = min(gpus, 8)
    out = []
    for tp in (t for t in (1, 2, 4, 8) if per_node % t == 0):
        for pp in (p for p in (1, 2, 4, 8, 16) if gpus % (tp * p) == 0):
            dp = gpus // (tp * pp)
            ep = max(e for e in range(1, dp * tp + 1) if (dp * tp) % e == 0 and n_experts % e == 0)
            for zero, recompute in ((1 if dp > 1 else 0, "none"), (3 if dp > 1 else 0, "full")):
                out.append({"tp": tp, "pp": pp, "dp": dp, "ep": ep, "zero": zero, "recompute": recompute})
    return sorted(out, key=lambda lay: (lay["tp"] * lay["pp"], lay["zero"], lay["tp"]))


def spec_data(name: str, model: dict[str, Any], routing: dict[str, Any], dtype: str, gpus: int | None,
              layout: dict[str, Any] | None = None, stops: list[int] | None = None) -> dict[str, Any]:
    lay = layout or {"tp": 1, "pp": 1, "dp": 1, "ep": 1, "zero": 0, "recompute": "none"}
    seq = min(model["max_seq_len"], 4096 if gpus else 256)
    micro = 2 * lay["pp"] if lay["pp"] > 1 else 1
    return {
        "name": name,
        "seed": 0,
        "model": model,
        "routing": routing,
        "quantization": {"experts": None},
        "parallelism": {"tp": lay["tp"], "pp": lay["pp"], "dp": lay["dp"], "ep": lay["ep"], "zero": lay["zero"],
                        "activation_checkpointing": lay["recompute"], "sequence_parallel": False,
                        "pipeline": {"schedule": "1f1b", "microbatches": micro, "virtual_stages": 1}},
        "cluster": _cluster(gpus),
        "train": {"seq_len": seq, "global_batch": lay["dp"] * micro * (1 if gpus else 4), "steps": 100,
                  "dtype": dtype,
                  "optimizer": {"name": "adamw", "lr": 1.0e-5, "betas": [0.9, 0.95], "weight_decay": 0.0,
                                "warmup_steps": 0, "grad_clip": 1.0},
                  "data": {"kind": "builtin" if model["tokenizer"] or model["vocab_size"] >= 256 else "synthetic"}},
        "serve": {"max_batch": 16, "max_seq_len": min(model["max_seq_len"], 4096), "dtype": dtype,
                  "stop_token_ids": stops or []},
    }


def import_config(model_dir: Path, out: Path, gpus: int | None = None, name: str | None = None) -> tuple[str, str]:
    """The spec text (YAML with a header saying where it came from and what was left off) of the model in
    `model_dir`, and the family. With `gpus`, the first layout (see `_layouts`) that validates and fits the
    device memory in the cost report; without, one CPU rank."""
    import yaml

    from lcc.compiler.cost import cost_report
    from lcc.spec import SpecError
    from lcc.spec.load import validate
    from lcc.spec.yaml_source import load_yaml

    path, data = read_config(Path(model_dir))
    family, model, routing, notes = model_sections(path, data)
    dtype = _dtype(_Config(path, data))
    stops, stop_notes = stop_tokens(Path(model_dir), data, model["vocab_size"])
    notes += stop_notes
    tokenizer = Path(model_dir) / "tokenizer.json"
    if tokenizer.is_file():
        model["tokenizer"] = os.path.relpath(tokenizer.resolve(), Path(out).resolve().parent)
    else:
        notes.append("the model folder has no tokenizer.json: text in and out is one token per byte.")
    if gpus is not None and gpus > 8 and gpus % 8:
        raise ImportRefused(f"--gpus {gpus}: more than one node takes a multiple of 8 GPUs")
    name = _slug(name or Path(model_dir).resolve().name)
    header = [f"{name}: imported from {Path(model_dir).name}/config.json ({family}) by lcc import hf.", *notes]
    candidates = _layouts(gpus, model["moe"]["n_experts"]) if gpus is not None else [None]
    errors = []
    for layout in candidates:
        data_out = spec_data(name, model, routing, dtype, gpus, layout, stops)
        text = yaml.safe_dump(data_out, sort_keys=False, default_flow_style=None, width=110)
        try:
            spec = validate(load_yaml(text.encode(), str(out)))
        except SpecError as exc:
            errors.append(str(exc))
            continue
        if gpus is not None and not cost_report(spec)["memory"]["fits"]:
            errors.append(f"{layout}: does not fit {H100['memory_gib']} GiB")
            continue
        if gpus is not None:
            par = data_out["parallelism"]
            header.append(f"layout for {gpus} GPUs: tp {par['tp']}, pp {par['pp']}, dp {par['dp']}, ep {par['ep']}, "
                          f"ZeRO {par['zero']}, activation checkpointing {par['activation_checkpointing']}: the first "
                          "that fits, with the least tensor and pipeline splitting.")
        lines = "".join(f"# {part}\n" for line in header for part in textwrap.wrap(line, 110))
        return lines + text, family
    if gpus is not None:
        raise ImportRefused(f"{path}: no layout of {gpus} GPUs fits this model in {H100['memory_gib']} GiB a GPU "
                            f"(tried {len(candidates)}); try more GPUs")
    raise ImportRefused(f"{path}: the spec lcc wrote for it does not validate:\n{errors[-1]}")


def hf_config(spec: Any) -> tuple[str, dict[str, Any]]:
    """The transformers config (family, config.json data) of an lcc spec that one of the supported families
    computes exactly; ImportRefused naming the spec field otherwise. The family follows from the query and
    key norms: per head Qwen3-MoE, over all heads OLMoE, none Mixtral (which always renormalises)."""
    m, r = spec.model, spec.routing
    att = m.attention

    def refuse(field: str, why: str) -> ImportRefused:
        return ImportRefused(f"spec {spec.name}: {field}: {why}; a Hugging Face family computes it differently")

    if m.moe is None or r is None:
        raise refuse("model.moe", "a dense model")
    checks = [("model.moe.n_groups", m.moe.n_groups == 1, "one group"),
              ("routing.score", r.score == "softmax", "softmax"),
              ("routing.experts.selection", r.experts.selection == "top_score", "top_score"),
              ("routing.k", r.k.min == r.k.max, "a fixed k (min = max)"),
              ("routing.gate_scale", r.gate_scale == 1.0, "1"),
              ("routing.capacity_factor", r.capacity_factor is None, "null (dropless)"),
              ("model.moe.n_shared_experts", m.moe.n_shared_experts == 0, "0")]
    for field, ok, want in checks:
        if not ok:
            raise refuse(field, f"must be {want}")
    family = {"none": "mixtral", "head": "qwen3_moe", "all": "olmoe"}[att.qk_norm]
    if family != "qwen3_moe" and m.moe_layers != tuple(range(m.n_layers)):
        raise refuse("model.moe.layers", f"{family} has MoE in every layer (dense layers need qk_norm head: "
                     "Qwen3-MoE)")
    if family == "mixtral" and not r.renormalize:
        raise refuse("routing.renormalize", "Mixtral renormalises the top-k gates (without it: qk_norm head or "
                     "all, Qwen3-MoE or OLMoE)")
    dtype = spec.train.dtype
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": m.vocab_size,
        "hidden_size": m.d_model, "num_hidden_layers": m.n_layers, "num_attention_heads": att.n_heads,
        "num_key_value_heads": att.n_kv_heads, "head_dim": att.head_dim, "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps, "tie_word_embeddings": m.tie_embeddings, "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": att.rope_theta}, "rope_theta": att.rope_theta,
        "num_experts_per_tok": r.k.max, "attention_bias": False, "attention_dropout": 0.0, "dtype": dtype,
        "torch_dtype": dtype, "output_router_logits": False, "use_cache": True, "initializer_range": 0.02,
    }
    if r.balance.aux_loss_coef > 0:  # lcc's own balance loss (per layer); without one, the family's default
        config["router_aux_loss_coef"] = r.balance.aux_loss_coef
    if family == "mixtral":
        config.update(num_local_experts=m.moe.n_experts, intermediate_size=m.moe.expert_d_ff, sliding_window=None,
                      router_jitter_noise=0.0)
    elif family == "olmoe":
        config.update(num_experts=m.moe.n_experts, intermediate_size=m.moe.expert_d_ff,
                      norm_topk_prob=r.renormalize, clip_qkv=None)
    else:
        dense = [i for i in range(m.n_layers) if not m.is_moe(i)]
        config.update(num_experts=m.moe.n_experts, moe_intermediate_size=m.moe.expert_d_ff,
                      intermediate_size=m.ffn.d_ff if m.ffn is not None else m.moe.expert_d_ff,
                      norm_topk_prob=r.renormalize, decoder_sparse_step=1, mlp_only_layers=dense,
                      use_sliding_window=False, sliding_window=None)
    return family, dict(sorted(config.items()))

