"""The server's slots: P workers (each a `Pair` replica with its own llama.cpp contexts on the
shared weights), the pool that hands them to requests, the job that runs one generation on a
worker's thread, and the Prometheus metrics they update."""

from __future__ import annotations

import asyncio
import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..api import Pair
from ..engine import DoneEvent
from ..slots import common_prefix


class Metrics:
    """Prometheus metrics of one server (its own registry, so several servers can live in one
    process, as in the tests)."""

    def __init__(self, n_slots: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("cospec_requests", "Requests answered, by endpoint and HTTP status.", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("cospec_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.cached_tokens = Counter("cospec_prompt_tokens_cached", "Prompt tokens whose KV cache entries were reused.", registry=r)
        self.generated_tokens = Counter("cospec_generated_tokens", "Tokens generated.", registry=r)
        self.drafted_tokens = Counter("cospec_drafted_tokens", "Proposed tokens that were verified.", registry=r)
        self.accepted_tokens = Counter("cospec_accepted_tokens", "Proposed tokens that verification accepted.", registry=r)
        self.acceptance_rate = Gauge("cospec_acceptance_rate", "Accepted / drafted tokens since the server started.", registry=r)
        self.tokens_per_second = Gauge("cospec_tokens_per_second", "Decode tokens/s of the last finished request.", registry=r)
        self.decode_seconds = Histogram("cospec_decode_seconds", "Decode time per request.", registry=r)
        self.queue_length = Gauge("cospec_queue_length", "Requests waiting for a free slot.", registry=r)
        self.queue_wait = Histogram("cospec_queue_wait_seconds", "Time requests waited for a slot.", registry=r)
        self.queue_wait_max = Gauge("cospec_queue_wait_max_seconds", "Longest wait for a slot since the server started.", registry=r)
        self.slots_busy = Gauge("cospec_slots_busy", "Slots decoding a request.", registry=r)
        self.slots_total = Gauge("cospec_slots", "Parallel slots (--parallel).", registry=r)
        self.cancelled = Counter("cospec_cancelled", "Generations stopped because the client went away.", registry=r)
        self.slots_total.set(n_slots)
        self._drafted = self._accepted = 0

    def observe(self, stats) -> None:
        """Count one finished (or cancelled) generation."""
        self.prompt_tokens.inc(stats.n_prompt)
        self.cached_tokens.inc(stats.n_prompt_cached)
        self.generated_tokens.inc(stats.n_generated)
        self.drafted_tokens.inc(stats.n_drafted)
        self.accepted_tokens.inc(stats.n_accepted)
        # The rate since the start, from our own sums: prometheus counters cannot be read back.
        self._drafted += stats.n_drafted
        self._accepted += stats.n_accepted
        if self._drafted:
            self.acceptance_rate.set(self._accepted / self._drafted)
        if stats.n_generated:
            self.tokens_per_second.set(stats.tokens_per_second)
            self.decode_seconds.observe(stats.t_decode)


class Worker:
    """One slot: a Pair replica (own contexts, shared weights) and its conversation."""

    def __init__(self, index: int, pair: Pair):
        self.index = index
        self.pair = pair
        self.conversation = pair.engine.new_conversation()
        self.busy = False
        self.job: Job | None = None

    def cached_prefix(self, tokens: list[int]) -> int:
        """How many leading tokens of `tokens` this slot's target cache already holds."""
        return common_prefix(self.pair.engine.cached_tokens(), tokens)


class WorkerPool:
    """Free workers go to requests in arrival order; runs on the event loop (no locks needed)."""

    def __init__(self, workers: list[Worker], metrics: Metrics):
        self.workers = workers
        self.metrics = metrics
        self._waiters: collections.deque[asyncio.Future] = collections.deque()  # FIFO: handed over in order
        self.longest_wait = 0.0

    @property
    def n_waiting(self) -> int:
        """Requests queued for a worker (not counting those that gave up)."""
        return sum(1 for fut in self._waiters if not fut.done())

    @property
    def n_busy(self) -> int:
        """Workers serving a request."""
        return sum(w.busy for w in self.workers)

    def _update(self) -> None:
        self.metrics.queue_length.set(self.n_waiting)
        self.metrics.slots_busy.set(self.n_busy)

    async def acquire(self, tokens: list[int]) -> Worker:
        """A free worker, preferring the one whose cache holds the longest prefix of `tokens`;
        waits in FIFO order when all are busy."""
        t0 = time.perf_counter()
        free = [w for w in self.workers if not w.busy]
        if free and not self._waiters:  # nobody queued ahead: take a free one at once
            worker = max(free, key=lambda w: w.cached_prefix(tokens))
            worker.busy = True
            self._update()
            return worker
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        self._update()
        try:
            worker = await future
        except asyncio.CancelledError:
            # Gone while queued. If a worker was handed over at the same moment, pass it on.
            if future.done() and not future.cancelled():
                self.release(future.result())
            raise
        finally:
            self._update()
        waited = time.perf_counter() - t0
        self.metrics.queue_wait.observe(waited)
        self.longest_wait = max(self.longest_wait, waited)
        self.metrics.queue_wait_max.set(self.longest_wait)
        return worker

    def release(self, worker: Worker) -> None:
        """Give `worker` to the first live waiter, or mark it free."""
        worker.job = None
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(worker)  # stays busy: handed over
                self._update()
                return
        worker.busy = False
        self._update()


_END = object()  # the last item of a Job's queue: the worker is back in the pool


class Job:
    """One generation on a worker thread. Its events reach the event loop through `queue`; a
    `cancel()` stops the thread at the next prefill piece or token (the engine then trims its caches)."""

    def __init__(self, pool: WorkerPool, worker: Worker, events, loop: asyncio.AbstractEventLoop):
        self.pool, self.worker, self.events, self.loop = pool, worker, events, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stats = None
        self.thread = threading.Thread(target=self._run, name=f"cospec-slot-{worker.index}", daemon=True)
        worker.job = self
        self.thread.start()

    def _call(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is gone (shutdown): nobody is listening
            pass

    def _run(self) -> None:
        try:
            for event in self.events:
                if isinstance(event, DoneEvent):
                    self.stats = event.stats
                self._call(self.queue.put_nowait, event)
        except BaseException as e:  # reported to the request, never kills the server
            self._call(self.queue.put_nowait, e)
        finally:
            try:
                self.events.close()  # the engine's finally, if the loop above did not finish it
            except BaseException as e:
                self._call(self.queue.put_nowait, e)
            finally:
                self._call(self._finish)

    def _finish(self) -> None:
        """On the event loop: count the generation, free the slot, then end the event stream (so a
        client that sees the end finds its slot free)."""
        metrics = self.pool.metrics
        if self.stats is not None:
            metrics.observe(self.stats)
            if self.stats.finish_reason == "cancelled":
                metrics.cancelled.inc()
        self.pool.release(self.worker)
        self.queue.put_nowait(_END)

    def cancel(self) -> None:
        """Stop this job's generation. A no-op once the job has handed its worker back (on the
        event loop, like every caller): the worker's conversation may already serve another job."""
        if self.worker.job is self:
            self.worker.conversation.cancel()

    async def next(self):
        """The next event, an exception the generation raised, or _END."""
        return await self.queue.get()
