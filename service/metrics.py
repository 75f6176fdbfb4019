"""Prometheus metrics of one service instance (its own registry, so several apps can live in
one process, as they do in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_BATCH_TOKENS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "reward_requests", "HTTP requests answered", ["route", "status"], registry=r
        )
        self.request_latency = Histogram(
            "reward_request_latency_seconds", "Time from request to response", ["route"],
            buckets=_LATENCY, registry=r,
        )
        self.batch_size = Histogram(
            "reward_batch_size", "Items per forward pass", ["model"], buckets=_BATCH_SIZES, registry=r
        )
        self.batch_tokens = Histogram(
            "reward_batch_tokens", "Padded tokens per forward pass (rows x longest row)", ["model"],
            buckets=_BATCH_TOKENS, registry=r,
        )
        self.forward_latency = Histogram(
            "reward_forward_latency_seconds", "Time of one backend forward pass", ["model"],
            buckets=_LATENCY, registry=r,
        )
        self.queue_depth = Gauge(
            "reward_queue_depth", "Items accepted and not yet answered (the --max-queue-items bound)", ["model"], registry=r
        )
        self.forward_failures = Counter(
            "reward_forward_failures", "Forward passes the backend raised on (their requests got a 500)", ["model"], registry=r
        )
        self.items_scored = Counter("reward_items_scored", "Items scored", ["model"], registry=r)
        self.tokens_scored = Counter(
            "reward_tokens_scored", "Real (unpadded) tokens scored", ["model"], registry=r
        )
        self.padded_tokens = Counter(
            "reward_padded_tokens", "Tokens computed including padding", ["model"], registry=r
        )
        self.truncated_items = Counter(
            "reward_truncated_items", "Items cut to the model's max length", ["model"], registry=r
        )
        self.rejections = Counter(
            "reward_rejections",
            "Requests refused, by reason: body_too_large, too_many_items, field_too_long, validation, "
            "unauthenticated, forbidden, rate_limited, queue_full, deadline_exceeded, stopping, ...",
            ["reason"], registry=r,
        )

        # The score cache (--score-cache-size); hit rate = hits / (hits + misses).
        self.score_cache_hits = Counter(
            "reward_score_cache_hits", "Items answered from the score cache", ["model"], registry=r
        )
        self.score_cache_misses = Counter(
            "reward_score_cache_misses", "Items looked up in the score cache and not found (then scored)", ["model"], registry=r
        )
        self.score_cache_entries = Gauge("reward_score_cache_entries", "Rewards held in the score cache", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
