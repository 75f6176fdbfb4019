"""Dynamic batching across concurrent requests, bounded by a token budget.

Every request's items go into one queue per model. A worker gathers what is waiting (after at
most ``max_wait_ms`` for company when the queue was empty), sorts it by length so rows of a
batch have similar lengths (little padding), cuts it into batches whose padded size
(rows x longest row) fits ``max_batch_tokens`` (and, on CPU, whose share of padding stays under
``max_padding``), and runs each forward in a worker thread so the
event loop keeps accepting and tokenising requests meanwhile. Each request gets its own scores
back through per-item futures, so a request larger than one batch is simply split.

What an item gets back is its row of the backend's answer, every column of it: the reward alone
for a single-head model, the reward then each objective head's for a model with objectives
(``Backend.score_batch``). The batcher does not pick among them; the routes do.

Fairness: the plan is made again before every forward, over everything waiting then, and the
batch run is chosen by turns: one forward for the request with the fewest items waiting, the
next for the next request in arrival order (round robin), and so on. A request of many batches
therefore runs one batch per turn; a small request that arrives meanwhile waits for about one
forward, not for the whole of a large one; and large requests still get at least every other
forward between them, so a stream of small ones cannot starve them.

Backpressure: at most ``max_queue_items`` items wait per model (queued or planned into a batch
not yet run); a request that does not fit is refused at once with ``QueueFull`` and an estimate
of when there will be room. A request that gives up (deadline, disconnect) takes its
not-yet-run items out of the queue. A failing forward fails only the requests in that batch.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from reward_core.backends import Backend
from reward_core.formatting import EncodedInput
from reward_core.forward import pad_batch, plan_batches

from .metrics import ServiceMetrics
from .score_cache import ScoreCache

log = logging.getLogger(__name__)

RewardRow = tuple[float, ...]
"""One item's rewards: the model's reward, then each objective head's (none for a single-head model)."""


def reward_rows(rewards: np.ndarray) -> list[RewardRow]:
    """A backend's answer, [batch] or [batch, 1 + H], as one row of plain floats per item."""
    array = np.asarray(rewards, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    return [tuple(row) for row in array.tolist()]


class QueueFull(Exception):
    """The model's queue cannot take the request's items now."""

    def __init__(self, model: str, waiting: int, limit: int, retry_after_s: float) -> None:
        super().__init__(f"model {model!r} has {waiting} items waiting (limit {limit})")
        self.retry_after_s = retry_after_s


class ForwardFailed(RuntimeError):
    """The backend raised on the batch holding the request's items."""


class BatcherStopped(RuntimeError):
    """The service is shutting down and takes no new work."""


@dataclass(eq=False)  # identity: two items of equal text are still two items
class _QueuedItem:
    encoded: EncodedInput
    future: asyncio.Future
    owner: int  # the request it came with (numbered in arrival order)


class TokenBudgetBatcher:
    def __init__(
        self,
        backend: Backend,
        *,
        model_name: str,
        pad_token_id: int,
        max_batch_tokens: int = 16384,
        max_wait_ms: float = 5.0,
        max_batch_size: int | None = None,
        max_padding: float | None = None,
        max_queue_items: int | None = None,
        metrics: ServiceMetrics | None = None,
        cache: ScoreCache | None = None,
        cache_key: str = "",
    ) -> None:
        """``cache``: answer items seen before from it (``cache_key`` names the model and its
        version there) and queue only the others."""
        self.backend = backend
        self.cache = cache
        self.cache_key = cache_key or model_name
        self.model_name = model_name
        self.pad_token_id = pad_token_id
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.max_batch_size = max_batch_size
        self.max_padding = max_padding
        self.max_queue_items = max_queue_items
        self.metrics = metrics
        self._queue: list[_QueuedItem] = []
        # Items accepted and not yet answered: queued, or taken into a plan whose forward has not
        # run yet, or in the forward running now. This is what the queue bound applies to.
        self._pending = 0
        self._unanswered: set[asyncio.Future] = set()  # what stop() must fail if it cannot finish it
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._items_per_s: float | None = None  # smoothed forward throughput, for Retry-After
        self._queued_tokens = 0
        self._arrived = asyncio.Event()
        self._budget_full = asyncio.Event()
        self._requests = itertools.count()  # numbers the requests, for the round robin
        self._last_turn = -1  # the request whose item the last round-robin batch was chosen for
        self._smallest_next = True  # turns alternate: the smallest request, then round robin
        # One forward at a time per model: torch already spreads one forward over all cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"forward-{model_name}")
        self._worker: asyncio.Task | None = None

    @property
    def queue_depth(self) -> int:
        """Items accepted and not yet answered."""
        return self._pending

    def retry_after_s(self) -> float:
        """Rough time for the items waiting now to clear, from the observed forward throughput."""
        if not self._items_per_s:
            return 1.0
        return min(60.0, max(1.0, self._pending / self._items_per_s))

    def check_room(self, n_items: int) -> None:
        """Raise QueueFull (or BatcherStopped) unless ``n_items`` more items can wait now."""
        if self._closing:
            raise BatcherStopped("the service is shutting down")
        if self.max_queue_items is not None and self._pending + n_items > self.max_queue_items:
            raise QueueFull(self.model_name, self._pending, self.max_queue_items, self.retry_after_s())

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.model_name}")

    async def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Take no new work, let what was accepted finish (up to ``drain_timeout_s``), then stop."""
        self._closing = True
        if self._worker is not None and drain_timeout_s > 0 and self._pending:
            try:
                await asyncio.wait_for(self._idle.wait(), drain_timeout_s)
            except asyncio.TimeoutError:
                log.error("model %s: %d items still waiting after %.1f s of draining; failing them",
                          self.model_name, self._pending, drain_timeout_s)
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        # Items still queued, or planned into a batch the cancelled worker will not run.
        for future in list(self._unanswered):
            if not future.done():
                future.set_exception(BatcherStopped("the service is shutting down"))
        self._queue.clear()
        self._executor.shutdown(wait=True)

    async def score(self, encoded: list[EncodedInput]) -> list[float]:
        """Queue the items and wait for their rewards (in the given order): the model's reward,
        which for a model with objectives is their combination (column 0 of :meth:`score_rows`).

        Raises QueueFull when they do not fit, ForwardFailed when the backend fails on them."""
        return [row[0] for row in await self.score_rows(encoded)]

    async def score_rows(self, encoded: list[EncodedInput]) -> list[RewardRow]:
        """Each item's row of rewards, in the given order: ``(reward,)`` for a single-head model,
        ``(reward, head 1, ..., head H)`` for a model with H objectives. Raises as :meth:`score`."""
        if self.cache is None:
            return await self._score_queued(encoded)
        keys = self.cache.keys(self.cache_key, encoded)
        found = self.cache.lookup(self.model_name, keys)
        missing = [i for i, row in enumerate(found) if row is None]
        if missing:
            fresh = await self._score_queued([encoded[i] for i in missing])
            self.cache.store([keys[i] for i in missing], fresh)
            for i, row in zip(missing, fresh):
                found[i] = row
        return found  # type: ignore[return-value]  (every None was filled)

    async def _score_queued(self, encoded: list[EncodedInput]) -> list[RewardRow]:
        self.check_room(len(encoded))
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in encoded]
        owner = next(self._requests)
        self._pending += len(futures)
        self._idle.clear()
        for e, f in zip(encoded, futures):
            self._unanswered.add(f)
            f.add_done_callback(self._item_done)
            self._queue.append(_QueuedItem(e, f, owner))
            self._queued_tokens += len(e)
        self._update_depth()
        self._arrived.set()
        if self._queued_tokens >= self.max_batch_tokens:
            self._budget_full.set()
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            # The caller went away (disconnect, deadline) or one of its batches failed: drop its
            # items that have not run. Those already planned into a batch are skipped there.
            for f in futures:
                f.cancel()
            mine = set(futures)
            if any(q.future in mine for q in self._queue):
                self._queue = [q for q in self._queue if q.future not in mine]
                self._queued_tokens = sum(len(q.encoded) for q in self._queue)
                self._update_depth()
            raise

    def _item_done(self, future: asyncio.Future) -> None:
        self._unanswered.discard(future)
        self._pending -= 1
        if self._pending == 0:
            self._idle.set()

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                # The first item after a quiet spell waits a little for company to share its batch.
                if self._queued_tokens < self.max_batch_tokens and self.max_wait > 0:
                    try:
                        await asyncio.wait_for(self._budget_full.wait(), self.max_wait)
                    except asyncio.TimeoutError:
                        pass
            self._budget_full.clear()
            batch = self._next_batch()
            if batch:
                await self._forward(batch)

    def _next_batch(self) -> list[_QueuedItem]:
        """Plan what is waiting and take the batch holding an item of the next request in turn."""
        live = [q for q in self._queue if not q.future.done()]
        batch: list[_QueuedItem] = []
        if live:
            plan = plan_batches([len(q.encoded) for q in live], self.max_batch_tokens, self.max_batch_size, self.max_padding)
            waiting: dict[int, int] = {}
            for q in live:
                waiting[q.owner] = waiting.get(q.owner, 0) + 1
            if self._smallest_next:
                turn = min(waiting, key=lambda o: (waiting[o], o))
            else:
                owners = sorted(waiting)
                turn = next((o for o in owners if o > self._last_turn), owners[0])
                self._last_turn = turn
            self._smallest_next = not self._smallest_next
            chosen = next(indices for indices in plan if any(live[i].owner == turn for i in indices))
            batch = [live[i] for i in chosen]
            taken = set(batch)  # queued items compare and hash by identity (eq=False)
            live = [q for q in live if q not in taken]
        self._queue = live
        self._queued_tokens = sum(len(q.encoded) for q in live)
        self._update_depth()
        return batch

    async def _forward(self, items: list[_QueuedItem]) -> None:
        batch = pad_batch([q.encoded for q in items], self.pad_token_id)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            rewards = await loop.run_in_executor(self._executor, self.backend.score_batch, batch)
        except Exception as exc:  # one bad batch fails its own requests, not the server
            log.exception("forward pass failed for %d items of model %s", len(items), self.model_name)
            failure = ForwardFailed(f"{type(exc).__name__}: {exc}")
            for q in items:
                if not q.future.done():
                    q.future.set_exception(failure)
            if self.metrics is not None:
                self.metrics.forward_failures.labels(self.model_name).inc()
            return
        elapsed = time.perf_counter() - started
        rate = len(items) / max(elapsed, 1e-6)
        self._items_per_s = rate if self._items_per_s is None else 0.8 * self._items_per_s + 0.2 * rate
        if self.metrics is not None:
            m, name = self.metrics, self.model_name
            rows, longest = batch.input_ids.shape
            real = int(batch.attention_mask.sum())
            m.forward_latency.labels(name).observe(elapsed)
            m.batch_size.labels(name).observe(rows)
            m.batch_tokens.labels(name).observe(rows * longest)
            m.items_scored.labels(name).inc(rows)
            m.tokens_scored.labels(name).inc(real)
            m.padded_tokens.labels(name).inc(rows * longest)
        for q, row in zip(items, reward_rows(rewards)):
            if not q.future.done():
                q.future.set_result(row)

    def _update_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(self.model_name).set(self._pending)
