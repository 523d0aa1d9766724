"""What a serving rank holds beside its weights (docs/cost-model.md, "Memory per rank"): the paged KV cache it
allocates, and the workspace of an engine step, the most its tensors take at once while a step runs.

A serve program's stage forward names every layer's output until it returns, and a layer function its own
intermediates until it returns (inference keeps no activations for backward, but Python's names keep them).
So a step of `t` tokens holds the embedding's and each earlier layer's output, and the running layer's named
tensors: at its attention, the norm's output, q, k, v, their rotated copies and the attention output, beside
the keys and values of the contexts read from the cache; at its FFN, those up to the residual (two norms'
outputs, q, k, v, the attention output, its projection, the residual) and the FFN's own: the routed
experts' rows (k.max slots per token), their SwiGLU's w1|w3 output and product, and their outputs, per
expert and concatenated; a dense FFN's (or the shared experts') w1, w3, silu, product and output.
Two steps bound it: a prefill chunk of `max_batched_tokens` tokens reading one sequence's context, and a
decode step of `max_batch` sequences reading every context at `max_seq_len`. Torch-free.
"""

from __future__ import annotations

from lcc.compiler.cost import params as P
from lcc.spec.models import DTYPE_BYTES, Spec


def kv_cache_bytes(spec: Spec, n_layers: int) -> int:
    """The paged KV cache one rank allocates: `n_kv_blocks` blocks of `block_size` tokens, keys and values of
    its layers' local kv heads, in `serve.dtype`."""
    serve, att = spec.serve, spec.model.attention
    per_token = n_layers * 2 * P.local_kv_heads(spec) * att.head_dim * DTYPE_BYTES[serve.dtype]
    return serve.n_kv_blocks * serve.block_size * per_token


def _step(spec: Spec, n_layers: int, tokens: int, contexts: int) -> float:
    """Bytes a serving rank's step of `tokens` tokens holds at its busiest moment, its attention reading
    `contexts` tokens of keys and values from the cache."""
    m, par = spec.model, spec.parallelism
    ab = DTYPE_BYTES[spec.serve.dtype]
    att = m.attention
    h, q, kv = m.d_model, att.n_heads * att.head_dim / par.tp, P.local_kv_heads(spec) * att.head_dim
    held = n_layers * tokens * h * ab  # the embedding's and the earlier layers' outputs
    attention = tokens * ab * (h + 3 * q + 3 * kv) + contexts * 2 * kv * ab
    before_ffn = tokens * ab * (4 * h + 2 * q + 2 * kv)
    ffn = 0.0
    if m.moe is not None and spec.routing is not None:
        slots = tokens / par.tp * spec.routing.k.max
        ffn = slots * ab * (3 * h + 3 * m.moe.expert_d_ff)
        shared = m.moe.n_shared_experts * m.moe.expert_d_ff / par.tp
        ffn = max(ffn, slots * ab * 2 * h + tokens * ab * (2 * h + 4 * shared))  # the shared experts after them
    if m.ffn is not None:
        ffn = max(ffn, tokens * ab * (4 * m.ffn.d_ff / par.tp + h))
    return held + max(attention, before_ffn + ffn)


def serve_workspace_bytes(spec: Spec, n_layers: int, last: bool) -> float:
    """The most one serving rank's engine step holds beside weights and KV cache (see the module docstring),
    with the last stage's logits of every sequence's last position."""
    serve = spec.serve
    tokens = min(serve.max_batched_tokens, serve.max_batch * serve.max_seq_len)
    decodes = min(serve.max_batch, serve.max_batched_tokens)
    prefill = _step(spec, n_layers, tokens, serve.max_seq_len)
    decode = _step(spec, n_layers, decodes, decodes * serve.max_seq_len)
    logits = serve.max_batch * spec.model.vocab_size * DTYPE_BYTES[serve.dtype] if last else 0
    return max(prefill, decode) + logits
