"""Prometheus metrics of the server (GET /metrics): requests, tokens, queue length, batch size,
time to first token and tokens/s."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _SchedulerCollector:
    """Reads the scheduler's counters at scrape time."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def collect(self):
        s = self.scheduler
        yield CounterMetricFamily("glm6b_prompt_tokens", "Prompt tokens prefilled.", value=s.prompt_tokens_total)
        yield CounterMetricFamily("glm6b_generated_tokens", "Tokens generated.", value=s.generated_tokens_total)
        yield CounterMetricFamily("glm6b_decode_steps", "Scheduler steps run.", value=s.steps_total)
        yield CounterMetricFamily("glm6b_cancelled_requests", "Running requests dropped because their client left.",
                                  value=s.cancelled_total)
        yield GaugeMetricFamily("glm6b_queue_length", "Requests waiting for a batch row.", value=s.queue_length)
        yield GaugeMetricFamily("glm6b_batch_size", "Rows decoding now.", value=s.batch_size)
        yield GaugeMetricFamily("glm6b_tokens_per_second", "Tokens generated per second over the last 10 s.",
                                value=s.tokens_per_second(10.0))


class Metrics:
    """The server's metrics in a registry of its own (several apps can live in one process).

    Args:
        scheduler: the scheduler whose counters and gauges are exported.
    """

    def __init__(self, scheduler):
        self.registry = CollectorRegistry()
        self.requests = Counter("glm6b_requests", "HTTP requests answered, by endpoint and status code.",
                                ["endpoint", "status"], registry=self.registry)
        self.time_to_first_token = Histogram("glm6b_time_to_first_token_seconds",
                                             "Time from a generation request's arrival to its first token.",
                                             buckets=_TTFT_BUCKETS, registry=self.registry)
        self.request_seconds = Histogram("glm6b_generation_seconds", "Time from a generation request's arrival to "
                                         "its last token.", buckets=_TTFT_BUCKETS, registry=self.registry)
        self.registry.register(_SchedulerCollector(scheduler))

    def observe(self, generation, completion_tokens: int) -> None:
        """Record a finished generation's time to first token and duration."""
        del completion_tokens  # counted by the scheduler
        if generation.first_token_at is not None:
            self.time_to_first_token.observe(generation.first_token_at - generation.started)
        self.request_seconds.observe(time.monotonic() - generation.started)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
