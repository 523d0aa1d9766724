"""The engine in a thread of rank 0, for a server: requests come in from any thread, updates go back to
each request's own callback, and idle ranks are kept in step.

The engine (and every collective) runs on this loop's thread only. `submit` and `abort` queue work for it;
each step's updates are handed to the request's `deliver` callback (a server passes one that puts them on
its event loop). When there is nothing to do, the loop broadcasts a keep-alive to the other ranks before
their collective timeout runs out. `drain` stops admission; `stop` aborts what is left and releases the
other ranks.

A request whose serving fails (its submission or its step raises, lcc.serve.engine) gets an `error`
update and the loop goes on; a callback that raises (a server's event loop that has closed) loses its
updates, nothing else. Only a failure of the engine itself (a step cut short with other ranks inside its
collectives) ends the loop: every request still open gets an `error` update, and the engine is closed
however the loop ends.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lcc.serve.engine import Engine, Update, keep_alive
from lcc.serve.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Tracked:
    """A request as the server sees it: its engine id once submitted, its timings and counts."""

    key: int
    prompt: list[int]
    params: SamplingParams
    deliver: Callable[[Update], None]
    arrived: float = field(default_factory=time.monotonic)
    engine_id: int | None = None
    first_token: float | None = None
    last_token: float | None = None
    generated: int = 0


class EngineLoop:
    def __init__(self, start: Callable[[], Engine], keep_alive_s: float, metrics: Any = None):
        """`start()` builds the engine on the loop's thread (loading weights); `/health` says 503 until then."""
        self.start, self.keep_alive_s, self.metrics = start, keep_alive_s, metrics
        self.inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.keys = itertools.count()
        self.tracked: dict[int, Tracked] = {}  # by engine id
        self.by_key: dict[int, Tracked] = {}
        self.ready = threading.Event()
        self.accepting = True
        self.failure: BaseException | None = None
        self.engine: Engine | None = None
        self.stopped = threading.Event()
        self.prefix_counted = (0, 0)  # prefix-cache hit and query tokens already in the metrics
        self.thread = threading.Thread(target=self._main, name="lcc-engine", daemon=True)

    # ------------------------------------------------------------------------- from any thread
    def begin(self) -> None:
        self.thread.start()

    @property
    def healthy(self) -> bool:
        return self.ready.is_set() and self.accepting and self.failure is None and not self.stopped.is_set()

    def queued(self) -> int:
        """Requests accepted and not yet running: in the inbox, or waiting in the scheduler."""
        engine = self.engine
        waiting = sum(len(q) for q in engine.scheduler.waiting) if engine is not None else 0
        return self.inbox.qsize() + waiting

    def submit(self, prompt: list[int], params: SamplingParams, deliver: Callable[[Update], None]) -> int:
        key = next(self.keys)
        self.inbox.put(("submit", Tracked(key, prompt, params, deliver)))
        return key

    def abort(self, key: int) -> None:
        self.inbox.put(("abort", key))

    def drain(self) -> None:
        """Admit nothing more; what runs goes on."""
        self.accepting = False

    def idle(self) -> bool:
        return self.inbox.empty() and not self.tracked

    def stop(self) -> None:
        """Abort everything left, release the other ranks and end the thread (waits for it)."""
        self.inbox.put(("stop", None))
        self.thread.join()

    # ------------------------------------------------------------------------------- the thread
    def _main(self) -> None:
        try:
            self.engine = self.start()
            if self.metrics is not None:
                self.metrics.watch_experts(self.engine.expert_counts)
            self.ready.set()
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - the server reports it and ends
            self.failure = exc
            for t in list(self.tracked.values()):
                self._count_finished("error")
                self._call(t, Update(t.key, [], "", "error", f"the engine failed: {type(exc).__name__}: {exc}"))
            self.tracked.clear()
            self.by_key.clear()
        finally:
            self._close()
            self.stopped.set()

    def _close(self) -> None:
        """Release the other ranks (the engine knows when it must not: a step of theirs was cut short)."""
        if self.engine is None:
            return
        try:
            self.engine.close()
        except Exception as exc:  # noqa: BLE001 - the first failure is the one to report
            if self.failure is None:
                self.failure = exc

    def _serve(self) -> None:
        engine = self.engine
        last_step = time.monotonic()
        while True:
            timeout = 0.0 if engine.has_work else max(0.0, self.keep_alive_s - (time.monotonic() - last_step))
            stop = self._take(timeout)
            if stop:
                for t in list(self.tracked.values()):
                    self._finish_abort(t)
                self._abort_queued()
                return
            if engine.has_work:
                updates = engine.step()
                last_step = time.monotonic()
                self._gauges()  # before any reply leaves: a client that has its answer sees the step's state
                for u in updates:
                    self._deliver(u)
            elif time.monotonic() - last_step >= self.keep_alive_s:
                keep_alive(engine)
                last_step = time.monotonic()

    def _take(self, timeout: float) -> bool:
        """Move queued submissions and aborts into the engine; True when asked to stop."""
        try:
            kind, item = self.inbox.get(timeout=timeout) if timeout > 0 else self.inbox.get_nowait()
        except queue.Empty:
            return False
        while True:
            if kind == "stop":
                return True
            if kind == "submit":
                self._submit(item)
            elif kind == "abort":
                t = self.by_key.get(item)
                if t is not None:
                    self._finish_abort(t)
            try:
                kind, item = self.inbox.get_nowait()
            except queue.Empty:
                self._gauges()
                return False

    def _submit(self, t: Tracked) -> None:
        try:
            t.engine_id = self.engine.submit(t.prompt, t.params)
        except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
            log.error("request %d could not be submitted", t.key, exc_info=exc)
            self._count_finished("error")
            self._call(t, Update(t.key, [], "", "error", f"{type(exc).__name__}: {exc}"))
            return
        self.tracked[t.engine_id] = t
        self.by_key[t.key] = t
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(t.prompt))

    def _abort_queued(self) -> None:
        """Requests submitted after `stop` end at once (aborted) rather than wait for a thread that is gone."""
        while True:
            try:
                kind, item = self.inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                self._count_finished("abort")
                self._call(item, Update(item.key, [], "", "abort"))

    def _finish_abort(self, t: Tracked) -> None:
        try:
            update = self.engine.abort(t.engine_id)
        except Exception as exc:  # noqa: BLE001 - the request ends all the same
            log.error("request %d could not be aborted cleanly", t.key, exc_info=exc)
            update = None
        self._deliver(update if update is not None else Update(t.engine_id, [], "", "abort"))

    def _call(self, t: Tracked, u: Update) -> None:
        """Hand an update to its request's callback; a callback that raises loses it, and nothing else."""
        try:
            t.deliver(u)
        except Exception as exc:  # noqa: BLE001 - e.g. the server's event loop has closed: nobody waits for it
            log.warning("an update of request %d could not be delivered: %s", t.key, exc)

    def _count_finished(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.finished.labels(reason=reason).inc()

    def _deliver(self, u: Update) -> None:
        t = self.tracked.get(u.request)
        if t is None:
            return
        now = time.monotonic()
        m = self.metrics
        if u.token_ids:
            if t.first_token is None:
                t.first_token = now
                if m is not None:
                    m.time_to_first_token.observe(now - t.arrived)
            elif m is not None:
                m.inter_token_latency.observe((now - t.last_token) / len(u.token_ids))
            t.last_token = now
            t.generated += len(u.token_ids)
            if m is not None:
                m.generation_tokens.inc(len(u.token_ids))
        if u.finished:
            del self.tracked[u.request]
            self.by_key.pop(t.key, None)
            if m is not None:
                m.e2e_latency.observe(now - t.arrived)
            self._count_finished(u.finished)
        self._call(t, dataclasses.replace(u, request=t.key))

    def _gauges(self) -> None:
        m, engine = self.metrics, self.engine
        if m is None or engine is None:
            return
        sched = engine.scheduler
        m.running.set(sum(len(r) for r in sched.running))
        m.waiting.set(sum(len(w) for w in sched.waiting))
        total = sum(b.n_blocks for b in sched.blocks)
        m.kv_blocks_used.set(sched.used_blocks)
        m.kv_usage.set(sched.used_blocks / total if total else 0.0)
        hits, queries = (sum(getattr(b, k) for b in sched.blocks) for k in ("hit_tokens", "query_tokens"))
        m.prefix_hit_tokens.inc(hits - self.prefix_counted[0])
        m.prefix_query_tokens.inc(queries - self.prefix_counted[1])
        self.prefix_counted = (hits, queries)
