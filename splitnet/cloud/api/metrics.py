"""Prometheus metrics of the HTTP API, in the app's own registry (``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class APIMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("splitnet_api_requests", "HTTP requests by route and status code", ["route", "status"], registry=r)
        self.request_seconds = Histogram("splitnet_api_request_seconds", "Time to the response's headers, by route", ["route"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.generation_seconds = Histogram("splitnet_api_generation_seconds", "Time of a whole generation (streamed or not), by route", ["route"],
                                            buckets=LATENCY_BUCKETS_S, registry=r)
        self.ttft_seconds = Histogram("splitnet_api_time_to_first_token_seconds", "Time from request to the first generated token", ["route"],
                                      buckets=LATENCY_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter("splitnet_api_prompt_tokens", "Prompt (input) tokens of served requests", ["route"], registry=r)
        self.completion_tokens = Counter("splitnet_api_completion_tokens", "Generated (output) tokens", ["route"], registry=r)
        self.auth_refusals = Counter("splitnet_api_auth_refusals", "Requests refused for a missing or wrong API key", registry=r)
        self.replays = Counter("splitnet_api_replays", "Requests replayed into a recovered pipeline (SDK recovery)", registry=r)
        self.in_flight = Gauge("splitnet_api_requests_in_flight", "Requests being served now", registry=r)
        self.sessions_busy = Gauge("splitnet_api_sessions_busy", "Pipeline sessions in use", registry=r)
        self.sessions_total = Gauge("splitnet_api_sessions", "Pipeline sessions this server may hold (--sessions)", registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
