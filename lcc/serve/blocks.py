"""KV cache blocks of one dp rank's cache: which are free, which each sequence holds, and (prefix caching)
which full blocks hold which tokens.

With prefix caching a full block's content is known by its key: the entry of the block before it (0 for a
sequence's first block) and its own tokens, compared exactly (no hash to collide). A new sequence reuses
the cached blocks of its longest cached prefix, always leaving its last prompt token to compute (its logits
are needed, and a shared block is never written again). A block is held by the sequences that use it
(reference counts); one no sequence holds keeps its content, in least-recently-used order, until a new block
is needed and no never-cached block is free.
"""

from __future__ import annotations

from collections import OrderedDict

Key = tuple[int, tuple[int, ...]]


class BlockManager:
    def __init__(self, n_blocks: int, block_size: int, prefix_caching: bool = False):
        self.n_blocks, self.block_size, self.prefix_caching = n_blocks, block_size, prefix_caching
        self.free: list[int] = list(range(n_blocks - 1, -1, -1))  # pop() hands out the lowest first
        self.tables: dict[int, list[int]] = {}
        self.refs: dict[int, int] = {}  # block -> sequences holding it
        self.entries: dict[Key, tuple[int, int]] = {}  # key -> (entry id, block)
        self.key_of: dict[int, Key] = {}  # cached block -> its key
        self.idle: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, least recently used first
        self.committed: dict[int, tuple[int, int]] = {}  # sequence -> (its blocks registered, the last one's entry)
        self.next_entry = 1
        self.hit_tokens = self.query_tokens = 0

    @property
    def used(self) -> int:
        """Blocks some sequence holds."""
        return self.n_blocks - len(self.free) - len(self.idle)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def missing(self, seq: int, tokens: int) -> int:
        """Blocks sequence `seq` still needs to hold `tokens` tokens."""
        return max(0, self.blocks_for(tokens) - len(self.tables.get(seq, [])))

    def can_hold(self, seq: int, tokens: int) -> bool:
        return self.missing(seq, tokens) <= len(self.free) + len(self.idle)

    def grow(self, seq: int, tokens: int) -> list[int]:
        """Give `seq` the blocks for `tokens` tokens (the caller checked `can_hold`); its block table."""
        table = self.tables.setdefault(seq, [])
        for _ in range(self.missing(seq, tokens)):
            block = self.free.pop() if self.free else self._evict()
            self.refs[block] = 1
            table.append(block)
        return table

    def _evict(self) -> int:
        block, _ = self.idle.popitem(last=False)
        del self.entries[self.key_of.pop(block)]
        return block

    def match(self, seq: int, tokens: list[int]) -> int:
        """A new sequence: hold the cached blocks of its longest cached prefix (not its last token); the tokens
        they hold, which need not be computed again. (`counted` when the sequence is admitted.)"""
        if not self.prefix_caching or seq in self.tables:
            return 0
        bs, parent, table = self.block_size, 0, []
        for i in range((len(tokens) - 1) // bs):
            hit = self.entries.get((parent, tuple(tokens[i * bs:(i + 1) * bs])))
            if hit is None:
                break
            parent, block = hit
            table.append(block)
            self.refs[block] = self.refs.get(block, 0) + 1
            self.idle.pop(block, None)
        self.tables[seq] = table
        self.committed[seq] = (len(table), parent)
        return len(table) * bs

    def counted(self, hit: int, queried: int) -> None:
        """A sequence admitted with `hit` of its `queried` prompt tokens from the cache (the metrics' counts)."""
        self.hit_tokens += hit
        self.query_tokens += queried

    def commit(self, seq: int, tokens: list[int], computed: int) -> None:
        """Register the full blocks among the first `computed` tokens of `seq` (computed now) as cached."""
        if not self.prefix_caching:
            return
        bs, table = self.block_size, self.tables.get(seq, [])
        done, parent = self.committed.get(seq, (0, 0))
        for i in range(done, min(computed // bs, len(table))):
            key = (parent, tuple(tokens[i * bs:(i + 1) * bs]))
            hit = self.entries.get(key)
            if hit is None:  # new content: this block holds it from now on
                hit = (self.next_entry, table[i])
                self.next_entry += 1
                self.entries[key] = hit
                self.key_of[table[i]] = key
            parent, done = hit[0], i + 1
        self.committed[seq] = (done, parent)

    def release(self, seq: int) -> None:
        self.committed.pop(seq, None)
        for block in reversed(self.tables.pop(seq, [])):
            self.refs[block] -= 1
            if self.refs[block]:
                continue
            del self.refs[block]
            if block in self.key_of:
                self.idle[block] = None  # its content stays until the block is needed
            else:
                self.free.append(block)
