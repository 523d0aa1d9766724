"""Tiny random transformers models of each supported family, saved with save_pretrained, and the test's own
(independent of lcc.interop) reading of their tensors in lcc's names and layout."""

from __future__ import annotations

from pathlib import Path

import torch

from lcc.data.corpus import builtin_corpus

COMMON = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
HEAD_DIM = 16


def _families():
    import transformers as tf

    return {
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM,
                    dict(num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2, intermediate_size=32)),
        # a dense layer in the middle (mlp_only_layers), renormalised gates
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
                      dict(num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                           intermediate_size=48, head_dim=HEAD_DIM, norm_topk_prob=True, mlp_only_layers=[1])),
        "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM,
                  dict(num_hidden_layers=2, num_experts=8, num_experts_per_tok=3, intermediate_size=32)),
    }


FAMILIES = ("mixtral", "qwen3_moe", "olmoe")


def save_tokenizer(folder: Path) -> None:
    """A small BPE tokenizer.json (at most 128 tokens) trained on the built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    text = builtin_corpus()[:200_000].decode()
    tok.train_from_iterator([text[i:i + 1000] for i in range(0, len(text), 1000)],
                            trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>", "<s>", "</s>"]))
    assert tok.get_vocab_size() <= 128
    tok.save(str(folder / "tokenizer.json"))


def save_model(family: str, folder: Path, seed: int = 0, **changes) -> torch.nn.Module:
    """A float32 model of `family` with every weight random (norm weights around 1), saved in `folder`;
    `changes` to its config."""
    config_cls, model_cls, extra = _families()[family]
    config = config_cls(**{**COMMON, **extra, **changes})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return model


def rotary_rows(t: torch.Tensor) -> torch.Tensor:
    """transformers' rotary layout (dims j and j + h/2 rotate together) to lcc's (2j and 2j + 1), per head."""
    heads = t.reshape(-1, HEAD_DIM, *t.shape[1:])
    half = HEAD_DIM // 2
    order = [j // 2 + (j % 2) * half for j in range(HEAD_DIM)]
    return heads[:, order].reshape(t.shape)


def lcc_view(model: torch.nn.Module, family: str, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`values` (by transformers parameter name: weights or gradients) under lcc's names and layout."""
    cfg = model.config
    out = {"embed.weight": values["model.embed_tokens.weight"], "head.weight": values["lm_head.weight"],
           "norm.weight": values["model.norm.weight"]}
    for i in range(cfg.num_hidden_layers):
        hf, me = f"model.layers.{i}", f"layers.{i}"
        out[f"{me}.attn.wq.weight"] = rotary_rows(values[f"{hf}.self_attn.q_proj.weight"])
        out[f"{me}.attn.wk.weight"] = rotary_rows(values[f"{hf}.self_attn.k_proj.weight"])
        out[f"{me}.attn.wv.weight"] = values[f"{hf}.self_attn.v_proj.weight"]
        out[f"{me}.attn.wo.weight"] = values[f"{hf}.self_attn.o_proj.weight"]
        if family != "mixtral":
            out[f"{me}.attn.q_norm.weight"] = rotary_rows(values[f"{hf}.self_attn.q_norm.weight"])
            out[f"{me}.attn.k_norm.weight"] = rotary_rows(values[f"{hf}.self_attn.k_norm.weight"])
        out[f"{me}.attn_norm.weight"] = values[f"{hf}.input_layernorm.weight"]
        out[f"{me}.ffn_norm.weight"] = values[f"{hf}.post_attention_layernorm.weight"]
        if f"{hf}.mlp.gate_proj.weight" in values:  # a dense layer
            for mine, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[f"{me}.ffn.{mine}.weight"] = values[f"{hf}.mlp.{theirs}.weight"]
            continue
        gate_up, down = values[f"{hf}.mlp.experts.gate_up_proj"], values[f"{hf}.mlp.experts.down_proj"]
        f = gate_up.shape[1] // 2
        out[f"{me}.ffn.experts.w1_EFD"] = gate_up[:, :f]
        out[f"{me}.ffn.experts.w3_EFD"] = gate_up[:, f:]
        out[f"{me}.ffn.experts.w2_EDF"] = down
        out[f"{me}.ffn.router.weight_ED"] = values[f"{hf}.mlp.gate.weight"]
    return out


def float64_throughout(monkeypatch) -> None:
    """transformers computes RMSNorm and router (and eager attention) probabilities in float32 even in a float64
    model (`.to(torch.float32)`, `softmax(..., dtype=torch.float)`, `.float()`); the float64 comparisons lift
    those casts of float64 tensors to float64, leaving transformers' code as it is, so that they can hold to
    1e-9. Call it after lcc has run in this process: the casts are lifted for every tensor. (The rotary
    frequencies, a float32 buffer, are recomputed in float64 where the model is loaded.)"""
    to, softmax, single = torch.Tensor.to, torch.nn.functional.softmax, torch.Tensor.float

    def wide(dtype):
        return torch.float64 if dtype == torch.float32 else dtype

    def to_wide(self, *args, **kwargs):
        if self.dtype == torch.float64:
            args = tuple(wide(a) if isinstance(a, torch.dtype) else a for a in args)
            if "dtype" in kwargs:
                kwargs["dtype"] = wide(kwargs["dtype"])
        return to(self, *args, **kwargs)

    def softmax_wide(x, dim=None, _stacklevel=3, dtype=None):
        return softmax(x, dim=dim, dtype=wide(dtype) if x.dtype == torch.float64 else dtype)

    def float_wide(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else single(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to_wide)
    monkeypatch.setattr(torch.Tensor, "float", float_wide)
    monkeypatch.setattr(torch.nn.functional, "softmax", softmax_wide)
