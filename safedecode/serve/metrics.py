"""Prometheus metrics of one server process (its own registry, so several apps can coexist)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Requests, tokens, queue depth, occupancy, time to first token, inter-token latency,
    reward-model calls."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("safedecode_requests", "Finished HTTP requests by model and "
                                "outcome", ["model", "outcome"], registry=r)
        self.prompt_tokens = Counter("safedecode_prompt_tokens", "Prompt tokens admitted",
                                     ["model"], registry=r)
        self.generation_tokens = Counter("safedecode_generation_tokens", "Tokens generated",
                                         ["model"], registry=r)
        self.queue_depth = Gauge("safedecode_queue_depth", "Requests waiting for a slot",
                                 ["model"], registry=r)
        self.running = Gauge("safedecode_running_sequences", "Sequences holding a slot",
                             ["model"], registry=r)
        self.ttft = Histogram("safedecode_time_to_first_token_seconds", "From arrival to the "
                              "first token", ["model"], buckets=_LATENCY, registry=r)
        self.itl = Histogram("safedecode_inter_token_latency_seconds", "Between a sequence's "
                             "consecutive tokens", ["model"], buckets=_LATENCY, registry=r)
        self.e2e = Histogram("safedecode_request_latency_seconds", "From arrival to the last "
                             "token", ["model"], buckets=_LATENCY, registry=r)
        self.reward = Histogram("safedecode_reward_call_seconds", "One batched reward-model "
                                "call of a route or DeAL model", ["model"], buckets=_LATENCY,
                                registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
