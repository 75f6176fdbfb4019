"""The batcher's bounds, without HTTP: a bounded queue, cancelled requests leaving it, and a stop
that finishes accepted work (or fails it, never leaves it hanging)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.batcher import BatcherStopped, QueueFull, TokenBudgetBatcher
from reward_core.formatting import EncodedInput


class SummingBackend:
    """Reward = sum of a row's token ids, so every item's score says which item it was."""

    name, device, dtype = "summing", "cpu", "float32"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.rows = 0
        self.gate = threading.Event()
        self.gate.set()

    def score_batch(self, batch) -> np.ndarray:
        self.gate.wait(10)
        time.sleep(self.delay_s)
        self.rows += len(batch.input_ids)
        return (batch.input_ids * batch.attention_mask).sum(axis=1).astype(np.float32)


def encoded(*ids: int) -> list[EncodedInput]:
    return [EncodedInput(input_ids=[i, i], token_type_ids=None, truncated=False) for i in ids]


def batcher(backend, **kwargs) -> TokenBudgetBatcher:
    return TokenBudgetBatcher(backend, model_name="m", pad_token_id=0, max_wait_ms=0, **kwargs)


async def test_the_queue_is_bounded_and_frees_as_answers_go_out():
    backend = SummingBackend()
    backend.gate.clear()
    b = batcher(backend, max_queue_items=4)
    b.start()
    first = asyncio.create_task(b.score(encoded(1, 2, 3)))
    await asyncio.sleep(0.05)
    with pytest.raises(QueueFull) as full:
        await b.score(encoded(4, 5))
    assert full.value.retry_after_s >= 1 and b.queue_depth == 3
    fits = asyncio.create_task(b.score(encoded(4)))
    backend.gate.set()
    assert await first == [2, 4, 6] and await fits == [8]
    assert b.queue_depth == 0
    await b.stop()


async def test_a_cancelled_request_takes_its_waiting_items_out_of_the_queue():
    backend = SummingBackend()
    backend.gate.clear()
    b = batcher(backend)
    b.start()
    running = asyncio.create_task(b.score(encoded(1)))
    await asyncio.sleep(0.05)  # its forward is held at the gate
    waiting = asyncio.create_task(b.score(encoded(2, 3, 4)))
    await asyncio.sleep(0.05)
    waiting.cancel()
    await asyncio.sleep(0.05)
    assert b.queue_depth == 1, "only the running item is left"
    backend.gate.set()
    assert await running == [2]
    await asyncio.sleep(0.05)
    assert backend.rows == 1, "none of the cancelled items reached the model"
    await b.stop()


async def test_stop_finishes_what_was_accepted_and_takes_nothing_new():
    b = batcher(SummingBackend(delay_s=0.05), max_batch_size=2)
    b.start()
    accepted = [asyncio.create_task(b.score(encoded(i, i + 1))) for i in range(0, 12, 2)]
    await asyncio.sleep(0)
    stopping = asyncio.create_task(b.stop(drain_timeout_s=10))
    await asyncio.sleep(0)
    with pytest.raises(BatcherStopped):
        await b.score(encoded(99))
    await stopping
    assert [await a for a in accepted] == [[2 * i, 2 * (i + 1)] for i in range(0, 12, 2)]


async def test_stop_fails_what_it_cannot_finish_instead_of_leaving_it_hanging():
    backend = SummingBackend(delay_s=0.2)
    b = batcher(backend, max_batch_size=1)
    b.start()
    accepted = asyncio.create_task(b.score(encoded(*range(10))))  # 10 forwards of 0.2 s
    await asyncio.sleep(0.05)
    await b.stop(drain_timeout_s=0.3)
    with pytest.raises(BatcherStopped):
        await asyncio.wait_for(accepted, 2)
