"""Fault injection for tests, kept out of the service: a backend wrapper the test controls."""

from __future__ import annotations

import threading
import time

import numpy as np


class ControlledBackend:
    """Wraps a real backend. A test can hold forward passes at ``gate`` (to fill the queue or
    run past a deadline deterministically), make chosen forwards raise (``fail_forwards``: their
    numbers, counted from 1 after ``reset``), or slow every forward by ``delay_s``. ``started``
    is set when a forward begins."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name, self.device, self.dtype = inner.name, inner.device, inner.dtype
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail_forwards: set[int] = set()
        self.delay_s = 0.0
        self.forwards = 0
        self.rows = 0

    def reset(self) -> None:
        """Forget the warm-up forward the service runs at start."""
        self.started.clear()
        self.forwards = self.rows = 0

    def score_batch(self, batch) -> np.ndarray:
        self.forwards += 1
        number = self.forwards
        self.started.set()
        if not self.gate.wait(timeout=60):
            raise TimeoutError("the test never opened the gate")
        if self.delay_s:
            time.sleep(self.delay_s)
        if number in self.fail_forwards:
            raise RuntimeError("injected fault: the backend failed on this batch")
        self.rows += len(batch.input_ids)
        return self.inner.score_batch(batch)
