"""The server's Prometheus metrics, in a registry of their own (several apps in one process do not collide)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from bittern.engine.scheduler import Scheduler, SchedulerStats

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Counters, gauges and histograms of one server (names prefixed ``bittern_``).

    * ``bittern_requests_total{endpoint, status}``: requests answered, by HTTP status (streams: when they end).
    * ``bittern_prompt_tokens_total`` / ``bittern_generation_tokens_total``: tokens in and out.
    * ``bittern_queue_depth`` / ``bittern_running_rows``: requests waiting for a row, rows decoding (read at
      scrape time).
    * ``bittern_time_to_first_token_seconds``: from a request's arrival to its first token.
    * ``bittern_inter_token_latency_seconds``: between consecutive tokens of a request.
    * ``bittern_request_duration_seconds``: from arrival to the last token.
    * ``bittern_scheduler_<counter>_total``: the engine thread's work, one counter per field of
      :class:`~bittern.engine.scheduler.SchedulerStats` (decode steps, rows and tokens; prefills, their tokens,
      slots and seconds; the host's wait for the GPU; shifts; cancellations).
    """

    def __init__(self, scheduler: Scheduler) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("bittern_requests", "Requests answered.", ["endpoint", "status"],
                                registry=self.registry)  # fmt: skip
        self.prompt_tokens = Counter("bittern_prompt_tokens", "Prompt tokens prefilled.", registry=self.registry)
        self.generation_tokens = Counter("bittern_generation_tokens", "Tokens generated.", registry=self.registry)
        queue = Gauge("bittern_queue_depth", "Requests waiting for a row.", registry=self.registry)
        queue.set_function(lambda: scheduler.queue_depth)
        running = Gauge("bittern_running_rows", "Rows of the batch holding a request.", registry=self.registry)
        running.set_function(lambda: scheduler.running)
        self.ttft = Histogram("bittern_time_to_first_token_seconds", "Arrival to first token.",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self.itl = Histogram("bittern_inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self.duration = Histogram("bittern_request_duration_seconds", "Arrival to last token.",
                                  buckets=_LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self.registry.register(_SchedulerCollector(scheduler))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _SchedulerCollector(Collector):
    """The scheduler's :class:`~bittern.engine.scheduler.SchedulerStats` as counters, read at scrape time."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats = self.scheduler.stats
        for item in fields(SchedulerStats):
            yield CounterMetricFamily(f"bittern_scheduler_{item.name}", item.metadata["help"],
                                      value=getattr(stats, item.name))  # fmt: skip
