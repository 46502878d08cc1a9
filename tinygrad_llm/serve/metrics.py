"""The server's Prometheus metrics, in a registry of their own (one per app, so tests can build many).

    tinygrad_llm_requests_total{route, status}            HTTP requests answered
    tinygrad_llm_request_seconds{route}                   wall time of each request (histogram)
    tinygrad_llm_time_to_first_token_seconds              submit -> first sampled token (histogram)
    tinygrad_llm_inter_token_seconds                      one sequence's gap between two tokens (histogram)
    tinygrad_llm_prompt_tokens_total                      tokens prefilled
    tinygrad_llm_completion_tokens_total                  tokens sampled
    tinygrad_llm_active_sequences / _queued_sequences     in the batch / waiting for a slot (gauges)
    tinygrad_llm_decode_batch_size                        sequences per decode step (histogram)
    tinygrad_llm_safety_events_total{stage, action}       moderation verdicts other than allow
                                                          (stage input|output, action block|redact|log)
"""
from __future__ import annotations

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    def __init__(self):
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError:
            raise ImportError("serving needs prometheus-client: pip install -e .[serve]") from None
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("tinygrad_llm_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=registry)
        self.request_seconds = Histogram("tinygrad_llm_request_seconds", "Wall time of a request", ["route"],
                                         buckets=_LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram("tinygrad_llm_time_to_first_token_seconds", "Submit to first sampled token",
                              buckets=_LATENCY_BUCKETS, registry=registry)
        self.token_latency = Histogram("tinygrad_llm_inter_token_seconds", "Gap between two tokens of a sequence",
                                       buckets=_LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("tinygrad_llm_prompt_tokens", "Prompt tokens prefilled", registry=registry)
        self.completion_tokens = Counter("tinygrad_llm_completion_tokens", "Tokens sampled", registry=registry)
        self.active = Gauge("tinygrad_llm_active_sequences", "Sequences in the decode batch", registry=registry)
        self.queued = Gauge("tinygrad_llm_queued_sequences", "Sequences waiting for a KV slot", registry=registry)
        self.batch_size = Histogram("tinygrad_llm_decode_batch_size", "Sequences per decode step",
                                    buckets=_BATCH_BUCKETS, registry=registry)
        self.safety = Counter("tinygrad_llm_safety_events", "Moderation verdicts other than allow",
                              ["stage", "action"], registry=registry)

    def render(self):
        """(body, content type) of the text exposition format."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
