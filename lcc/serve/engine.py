"""The engine on rank 0: requests in, tokens out, every rank stepping in lockstep on the plan.

`Engine` is a library: `submit` a prompt (token ids) with its sampling parameters, call `step` (or
iterate `run`) and read each request's new tokens and text from the updates, `abort` a request at any
time between steps. Each step: the scheduler chooses every dp rank's tokens; with more than one rank the
step's plan is broadcast to all (BROADCAST_BATCH); every rank runs its stages; the logits come back to
rank 0 (RETURN_LOGITS), which samples. The other ranks run `follow` until `close`.

A failure while serving one request ends that request alone (finish reason `error`, its blocks freed) and
the engine goes on: a sampler or decoder that raises for a sequence, or at world 1 a step that raises
(its sequences fail). With more ranks, a step cut short leaves the others inside its collectives, and the
engine itself fails.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lcc.data.tokenizer import plan_tokenizer
from lcc.plan.types import Serving
from lcc.serve.rank import ServeRank, StepPlan
from lcc.serve.routed import gather_counts, gather_routes, routed_lists
from lcc.serve.sampling import SamplingParams, generator_for, sample
from lcc.serve.scheduler import Scheduler, Sequence
from lcc.serve.structured import Grammars

log = logging.getLogger(__name__)

COUNTS_EVERY_S = 1.0  # how often, at world > 1, rank 0 collects the other ranks' per-expert counts


class RequestError(ValueError):
    """A request the engine cannot serve (said before it is queued); `field`: what makes it so (the prompt,
    or max_tokens)."""

    def __init__(self, message: str, field: str = "prompt"):
        super().__init__(message)
        self.field = field


def check_request(serving: Serving, vocab: int, prompt: list[int], params: SamplingParams) -> None:
    """RequestError unless the plan can serve this prompt: token ids in the vocabulary, room to generate
    within serve.max_seq_len, and a KV cache that can hold the whole sequence."""
    if not prompt:
        raise RequestError("the prompt is empty")
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
    if len(prompt) >= serving.max_seq_len:
        raise RequestError(f"the prompt has {len(prompt)} tokens; serve.max_seq_len {serving.max_seq_len} leaves no "
                           "room to generate")
    longest = min(serving.max_seq_len, len(prompt) + params.max_tokens)
    need = -(-longest // serving.block_size)
    if need > serving.kv_blocks:
        least = -(-(len(prompt) + 1) // serving.block_size)  # the prompt and one generated token
        raise RequestError(f"the request needs up to {need} KV cache blocks; the cache has {serving.kv_blocks} "
                           "(serve.kv_blocks)", "prompt" if least > serving.kv_blocks else "max_tokens")


@dataclass
class Update:
    request: int
    token_ids: list[int]  # new tokens of this step
    text: str  # new text of this step
    finished: str | None = None  # stop | length | abort | error
    error: str | None = None  # why serving it failed (finished: error)
    # per new token, when the request asked for them: the experts each MoE layer chose at the position that
    # produced it, in layer order (lcc.serve.routed)
    routed_experts: list[list[list[int]]] | None = None


@dataclass
class EngineStats:
    """Running totals (a server steps for weeks: nothing here grows with the steps)."""

    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    preemptions: int = 0
    max_step_tokens: int = 0  # the most tokens one step ran
    failed: int = 0  # requests that ended with an error


class Engine:
    def __init__(self, rank: ServeRank, max_num_seqs: int | None = None, max_batched_tokens: int | None = None,
                 beat: Any = None):
        if rank.mesh.rank != 0:
            raise ValueError("the engine runs on rank 0; other ranks follow()")
        self.rank = rank
        serving = rank.plan.serving
        self.serving = serving
        self.max_num_seqs = min(max_num_seqs or serving.max_batch, serving.max_batch)
        self.max_batched_tokens = max_batched_tokens or serving.max_batched_tokens
        if self.max_num_seqs < 1 or self.max_batched_tokens < 1:
            raise ValueError("--max-num-seqs and --max-batched-tokens must be positive")
        self.scheduler = Scheduler(rank.mesh.sizes["dp"], serving.kv_blocks, serving.block_size, self.max_num_seqs,
                                   self.max_batched_tokens, serving.prefix_caching)
        self.tokenizer = plan_tokenizer(rank.dir)
        self.stop_tokens = frozenset(rank.spec.serve.stop_token_ids if rank.spec.serve is not None else ())
        self.grammars = Grammars(self.tokenizer, sorted(self.stop_tokens), rank.spec.model.vocab_size)
        self.sequences: dict[int, Sequence] = {}
        self.ids = itertools.count()
        self.stats = EngineStats()
        self.closed = False
        self.interrupted = False  # a step's collectives began and did not end
        self.beat = beat  # the launcher's heartbeat of this rank (lcc.runtime.supervise), if any
        moe = rank.spec.model.moe
        # the per-expert counts other ranks reported (rank 0's own stay in its context): every MoE layer's
        sites = [f"layers.{i}.ffn" for i in rank.spec.model.moe_layers]
        self.collected = {s: torch.zeros(moe.n_experts, dtype=torch.int64) for s in sites} if moe else {}
        self.counts_due = time.monotonic() + COUNTS_EVERY_S

    # ------------------------------------------------------------------------------------- requests
    def submit(self, prompt: list[int], params: SamplingParams) -> int:
        """Queue a request; returns its id. RequestError when it cannot be served."""
        check_request(self.serving, self.rank.spec.model.vocab_size, prompt, params)
        rid = next(self.ids)
        seq = Sequence(rid, list(prompt), params, self.scheduler.least_loaded(), generator_for(params),
                       self.tokenizer.decoder(), tokens=list(prompt))
        if params.grammar is not None:
            seq.constraint = self.grammars.constraint(params.grammar)
        self.sequences[rid] = seq
        self.scheduler.add(seq)
        return rid

    def abort(self, request: int) -> Update | None:
        """Stop a request now and free its blocks; its final update (None if it had finished)."""
        seq = self.sequences.pop(request, None)
        if seq is None or seq.finished:
            return None
        self.scheduler.finish(seq, "abort")
        held = seq.out.flush() + seq.decoder.final()  # what a stop string held back
        return Update(request, [], held, "abort")

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ---------------------------------------------------------------------------------------- steps
    def step(self) -> list[Update]:
        """One step of every rank; the updates of the requests it advanced."""
        if not self.has_work:
            return []
        if self.beat is not None:
            self.beat.step(self.stats.steps)
        plan, chosen = self.scheduler.schedule()
        if not chosen:
            raise RuntimeError("the scheduler chose nothing although requests wait (the KV cache cannot hold any)")
        plan.routes = self.collected != {} and any(
            s.params.return_routed_experts and s.computed + n == len(s.tokens) for s, n in chosen)
        if self.rank.mesh.world > 1 and time.monotonic() >= self.counts_due:
            plan.counts, self.counts_due = True, time.monotonic() + COUNTS_EVERY_S
        try:
            logits, routes = self._run(plan)
        except Exception as exc:
            if self.rank.mesh.world > 1:
                raise  # the other ranks are inside this step's collectives: the engine cannot go on
            self.interrupted = False
            self.stats.steps += 1
            if self.beat is not None:
                self.beat.completed(self.stats.steps)
            return self._ended(self._fail(seq, exc) for seq, _ in chosen)
        rows = {d: 0 for d in range(len(plan.parts))}
        tokens: list[int | Exception | None] = []  # sampled before any sequence changes
        routed: list[list[list[int]] | None] = []
        for seq, n in chosen:
            routed.append(None)
            if seq.computed + n < len(seq.tokens):
                tokens.append(None)  # a prefill chunk short of the last token
                continue
            try:
                allowed = seq.constraint.allowed() if seq.constraint is not None else None
                tokens.append(sample(logits[seq.dp][rows[seq.dp]], seq.params, seq.generator, allowed))
                if seq.params.return_routed_experts and routes is not None:
                    routed[-1] = routed_lists(routes[seq.dp][rows[seq.dp]])
            except Exception as exc:  # noqa: BLE001 - this sequence fails, the others go on
                tokens.append(exc)
            rows[seq.dp] += 1
        self.stats.steps += 1
        self.stats.max_step_tokens = max(self.stats.max_step_tokens, sum(n for _, n in chosen))
        updates = []
        for (seq, n), token, experts in zip(chosen, tokens, routed, strict=True):
            if n == 1 and seq.computed == len(seq.tokens) - 1 and len(seq.tokens) > len(seq.prompt):
                self.stats.decode_tokens += 1
            else:
                self.stats.prefill_tokens += n
            seq.computed += n
            self.scheduler.computed(seq)
            if isinstance(token, Exception):
                updates.append(self._fail(seq, token))
            elif token is not None:
                try:
                    updates.append(self._advance(seq, token, experts))
                except Exception as exc:  # noqa: BLE001 - this sequence fails, the others go on
                    updates.append(self._fail(seq, exc))
        self.stats.preemptions = self.scheduler.preemptions
        if self.beat is not None:
            self.beat.completed(self.stats.steps)
        return self._ended(updates)

    def _ended(self, updates: Iterable[Update]) -> list[Update]:
        """The step's updates; the requests they finish are forgotten."""
        out = list(updates)
        for u in out:
            if u.finished:
                self.sequences.pop(u.request, None)
        return out

    def _fail(self, seq: Sequence, exc: BaseException) -> Update:
        """End a request whose serving raised: its blocks are freed, the error is its last update."""
        log.error("request %d failed", seq.id, exc_info=exc)
        self.scheduler.finish(seq, "error")
        self.stats.failed += 1
        return Update(seq.id, [], "", "error", f"{type(exc).__name__}: {exc}")

    def _run(self, plan: StepPlan) -> tuple[list, list | None]:
        """The step on every rank: each dp rank's logits and, when the plan asks for them, its returned rows'
        experts. Cut short by an error here, the other ranks are inside the step's collectives: `close` then
        must not broadcast (the launcher ends them, named by rank 0's error)."""
        self.interrupted = True
        if self.rank.mesh.world > 1:
            dist.broadcast_object_list([plan], src=0)
        out = finish_step(self.rank, plan, self.collected)
        self.interrupted = False
        return out

    def expert_counts(self) -> dict[int, torch.Tensor]:
        """Tokens routed to each expert since the server started, by MoE layer (other ranks' as of their last
        collection, at most COUNTS_EVERY_S old). Safe to call from another thread: it only reads."""
        own = self.rank.ctx.expert_counts
        return {int(site.split(".")[1]): total + own[site].cpu() if site in own else total.clone()
                for site, total in self.collected.items()}

    def _advance(self, seq: Sequence, token: int, experts: list[list[int]] | None = None) -> Update:
        seq.tokens.append(token)
        end = token in self.stop_tokens  # the model's end of sequence: generated, its text not shown
        if seq.constraint is not None and not end:
            seq.constraint.advance(token)
        text, stopped = seq.out.add("" if end else seq.decoder.add(token))
        reason = None
        if stopped:
            reason = "stop"
        elif end or (seq.constraint is not None and seq.constraint.done):  # the grammar is complete
            reason = "stop"
            text += seq.out.flush() + seq.decoder.final()
        elif len(seq.generated) >= seq.params.max_tokens or len(seq.tokens) >= self.serving.max_seq_len:
            reason = "length"
            text += seq.out.flush() + seq.decoder.final()
        if reason is not None:
            self.scheduler.finish(seq, reason)
        return Update(seq.id, [token], text, reason, routed_experts=None if experts is None else [experts])

    def run(self) -> Iterator[Update]:
        """Step until every submitted request has finished."""
        while self.has_work:
            yield from self.step()

    def close(self) -> None:
        """Release the other ranks from `follow`."""
        if not self.closed and not self.interrupted and self.rank.mesh.world > 1:
            dist.broadcast_object_list([None], src=0)
        self.closed = True


def finish_step(rank: ServeRank, plan: StepPlan, collected: dict[str, torch.Tensor]) -> tuple[list, list | None]:
    """A step on this rank and what it brings to rank 0, in the order every rank follows: the logits, the
    returned rows' experts (plan.routes), the other ranks' per-expert counts, added to `collected`
    (plan.counts). Rank 0 gets the logits and the experts; the others, empty lists and None."""
    logits = rank.gather_logits(plan, rank.step(plan))
    routes = gather_routes(rank, plan) if plan.routes else None
    if plan.counts:
        gather_counts(rank, collected)
    return logits, routes


IDLE = "idle"  # broadcast instead of a step when there is nothing to do: keeps the other ranks' waits short


def keep_alive(engine: Engine) -> None:
    """Tell the other ranks, waiting for the next step, that rank 0 is still there (before their collective
    timeout ends the wait)."""
    if engine.rank.mesh.world > 1 and not engine.closed:
        dist.broadcast_object_list([IDLE], src=0)


def follow(rank: ServeRank, beat: Any = None) -> None:
    """Ranks other than 0: run the steps rank 0 broadcasts, until it closes the engine."""
    steps = 0
    while True:
        box: list[StepPlan | str | None] = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return
        if box[0] == IDLE:
            if beat is not None:
                beat.beat("idle")
            continue
        if beat is not None:
            beat.step(steps)
        finish_step(rank, box[0], {})
        steps += 1
        if beat is not None:
            beat.completed(steps)
