"""Prometheus metrics of one teacher_server process (served at GET /metrics).

A private `CollectorRegistry` per server object (no module-level globals), so
tests or a benchmark can run several servers in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# The phases of `teacher_phase_seconds`: receiving the body, msgspec decoding,
# checks, waiting on vLLM, vLLM output -> protocol (/v1/logprobs only; in
# /v1/generate it is part of "engine"), encoding the answer.
PHASES = ("read", "decode", "validate", "engine", "convert", "encode")
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("teacher_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.tokens_scored = Counter("teacher_tokens_scored", "Positions scored by /v1/logprobs", registry=r)
        self.tokens_prefilled = Counter("teacher_tokens_prefilled",
                                        "Tokens run through the model by /v1/logprobs", registry=r)
        self.sequences_scored = Counter("teacher_sequences_scored", "Sequences scored by /v1/logprobs",
                                        registry=r)
        self.tokens_generated = Counter("teacher_tokens_generated", "Tokens sampled by /v1/generate",
                                        registry=r)
        self.rejected = Counter("teacher_rejected", "Requests refused before reaching the engine",
                                ["reason"], registry=r)
        self.queue_depth = Gauge("teacher_queue_depth", "Requests admitted and not yet answered",
                                 registry=r)
        self.queue_tokens = Gauge("teacher_queue_tokens", "Tokens of the requests admitted and not yet answered",
                                  registry=r)
        self.ready = Gauge("teacher_ready", "1 once the engine can score, 0 while loading or draining",
                           registry=r)
        self.latency = Histogram("teacher_request_latency_seconds", "Wall time of admitted requests",
                                 ["endpoint"], buckets=LATENCY_BUCKETS_S, registry=r)
        # Where a request's time goes in this process, by PHASES.
        self.phase = Histogram("teacher_phase_seconds", "Time of a successful request in each phase",
                               ["endpoint", "phase"], buckets=LATENCY_BUCKETS_S, registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
