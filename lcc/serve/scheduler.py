"""Rank 0's scheduler: which tokens of which sequences each dp rank runs in the next step.

Each dp rank serves its own sequences from its own KV cache. A step takes, per dp rank, first the decode
tokens of its running sequences, then prefill chunks (running sequences whose prompt is not all in the
cache yet, then waiting ones, oldest first) up to `max_batched_tokens` tokens and `max_num_seqs`
sequences. When a running sequence needs a block and none is free, the newest running sequence is
preempted: its blocks are freed and it waits again, to be recomputed (prompt and generated tokens, as one
prefill) when blocks are free. A sequence's logits are wanted when its chunk reaches its last token. With
prefix caching a sequence admitted from the queue starts after its longest cached prefix (lcc.serve.blocks).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import torch

from lcc.data.tokenizer import Decoder
from lcc.serve.blocks import BlockManager
from lcc.serve.rank import SeqPart, StepPlan
from lcc.serve.sampling import SamplingParams
from lcc.serve.stops import StopScan


@dataclass(eq=False)  # a sequence is itself, not its fields
class Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    dp: int
    generator: torch.Generator | None
    decoder: Decoder
    tokens: list[int] = field(default_factory=list)  # prompt, then generated
    computed: int = 0  # tokens whose keys and values are in the cache
    finished: str | None = None  # stop | length | abort | error
    preemptions: int = 0
    constraint: Any = None  # its grammar, when the request has one (lcc.serve.structured.Constraint)
    out: StopScan = field(init=False)  # its text on the way out, against its stop strings

    def __post_init__(self) -> None:
        self.out = StopScan(self.params.stop)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.computed


class Scheduler:
    def __init__(self, dp: int, n_blocks: int, block_size: int, max_num_seqs: int, max_batched_tokens: int,
                 prefix_caching: bool = False):
        self.dp = dp
        self.blocks = [BlockManager(n_blocks, block_size, prefix_caching) for _ in range(dp)]
        self.max_num_seqs, self.max_batched_tokens = max_num_seqs, max_batched_tokens
        self.waiting: list[collections.deque[Sequence]] = [collections.deque() for _ in range(dp)]
        self.running: list[list[Sequence]] = [[] for _ in range(dp)]
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting[seq.dp].append(seq)

    def least_loaded(self) -> int:
        return min(range(self.dp), key=lambda d: (len(self.running[d]) + len(self.waiting[d]), d))

    @property
    def has_work(self) -> bool:
        return any(self.waiting) or any(self.running)

    def schedule(self) -> tuple[StepPlan, list[tuple[Sequence, int]]]:
        """The next step's plan, and the (sequence, tokens) it runs."""
        parts: list[list[SeqPart]] = []
        chosen: list[tuple[Sequence, int]] = []
        for d in range(self.dp):
            mine = self._schedule_dp(d)
            parts.append([SeqPart(s.id, s.computed, s.tokens[s.computed:s.computed + n],
                                  list(self.blocks[d].tables[s.id]), s.computed + n == len(s.tokens))
                          for s, n in mine])
            chosen += mine
        return StepPlan(parts), chosen

    def _schedule_dp(self, d: int) -> list[tuple[Sequence, int]]:
        blocks, running = self.blocks[d], self.running[d]
        budget = self.max_batched_tokens
        out: list[tuple[Sequence, int]] = []
        preempted = self.preemptions
        order = sorted(running, key=lambda s: s.remaining != 1)  # decodes first (stable: oldest first)
        for seq in order:
            if seq not in running or budget == 0:
                continue
            n = min(seq.remaining, budget)
            while not blocks.can_hold(seq.id, seq.computed + n):
                victim = next(s for s in reversed(running) if all(s is not c for c, _ in out))
                self.preempt(victim)
                if victim is seq:
                    break
            if seq not in running:
                continue
            blocks.grow(seq.id, seq.computed + n)
            out.append((seq, n))
            budget -= n
        waiting = self.waiting[d]
        while waiting and budget > 0 and len(running) < self.max_num_seqs and self.preemptions == preempted:
            # (after a preemption the cache is full: nothing is admitted in this step)
            seq = waiting[0]
            fresh = seq.computed == 0 and seq.id not in blocks.tables
            if fresh:  # its cached prefix (prefix caching), held while it is admitted
                seq.computed = blocks.match(seq.id, seq.tokens)
            n = min(seq.remaining, budget)
            if not blocks.can_hold(seq.id, seq.computed + n):
                if fresh:  # not admitted: a waiting sequence holds no block
                    blocks.release(seq.id)
                    seq.computed = 0
                break
            if fresh:
                blocks.counted(seq.computed, len(seq.tokens))
            waiting.popleft()
            running.append(seq)
            blocks.grow(seq.id, seq.computed + n)
            out.append((seq, n))
            budget -= n
        return out

    def computed(self, seq: Sequence) -> None:
        """After a step: the sequence's full blocks so far are cached for later requests (prefix caching)."""
        self.blocks[seq.dp].commit(seq.id, seq.tokens, seq.computed)

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it waits (first in line) to be computed again."""
        self.blocks[seq.dp].release(seq.id)
        self.running[seq.dp].remove(seq)
        seq.computed = 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting[seq.dp].appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.finished = reason
        self.blocks[seq.dp].release(seq.id)
        if seq in self.running[seq.dp]:
            self.running[seq.dp].remove(seq)
        if seq in self.waiting[seq.dp]:
            self.waiting[seq.dp].remove(seq)

    @property
    def used_blocks(self) -> int:
        return sum(b.used for b in self.blocks)
