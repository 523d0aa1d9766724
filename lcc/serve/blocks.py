"""KV cache blocks of one dp rank's cache: which are free, which each sequence holds."""

from __future__ import annotations


class BlockManager:
    def __init__(self, n_blocks: int, block_size: int):
        self.n_blocks, self.block_size = n_blocks, block_size
        self.free: list[int] = list(range(n_blocks - 1, -1, -1))  # pop() hands out the lowest first
        self.tables: dict[int, list[int]] = {}

    @property
    def used(self) -> int:
        return self.n_blocks - len(self.free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def missing(self, seq: int, tokens: int) -> int:
        """Blocks sequence `seq` still needs to hold `tokens` tokens."""
        return max(0, self.blocks_for(tokens) - len(self.tables.get(seq, [])))

    def can_hold(self, seq: int, tokens: int) -> bool:
        return self.missing(seq, tokens) <= len(self.free)

    def grow(self, seq: int, tokens: int) -> list[int]:
        """Give `seq` the blocks for `tokens` tokens (the caller checked `can_hold`); its block table."""
        table = self.tables.setdefault(seq, [])
        for _ in range(self.missing(seq, tokens)):
            table.append(self.free.pop())
        return table

    def release(self, seq: int) -> None:
        for block in reversed(self.tables.pop(seq, [])):
            self.free.append(block)
