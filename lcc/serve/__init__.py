"""Serving: a serve plan's ranks (weights, KV cache, routing tables), the engine on rank 0 (scheduler,
KV block manager, sampler) and `lcc run generate`. docs/serve.md describes it."""
