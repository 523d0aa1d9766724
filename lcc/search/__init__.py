"""Layout search over the cost model (lcc plan search, docs/search.md)."""
