"""Prometheus metrics of the server (prometheus_client, one registry per server)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("haq_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("haq_prompt_tokens", "prompt tokens of accepted requests", registry=r)
        self.generated = Counter("haq_generated_tokens", "tokens generated", registry=r)
        self.queue_depth = Gauge("haq_queue_depth", "requests waiting for their first token", registry=r)
        self.batch_size = Gauge("haq_batch_size", "sequences in the last decode step", registry=r)
        self.batch_hist = Histogram("haq_decode_batch_size", "sequences per decode step", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.hit_rate = Gauge("haq_expert_hit_rate", "expert calls served from device-resident weights", registry=r)
        self.cpu_share = Gauge("haq_expert_cpu_share", "expert calls computed on the CPU", registry=r)
        self.bytes_moved = Gauge("haq_expert_bytes_moved", "expert bytes copied to the device since start",
                                 registry=r)
        self.expert_calls = Gauge("haq_expert_calls", "expert calls since start", registry=r)
        self.expert_hits = Gauge("haq_expert_hits", "expert calls on device-resident weights since start", registry=r)
        self.expert_cpu_calls = Gauge("haq_expert_cpu_calls", "expert calls computed on the CPU since start",
                                      registry=r)
        self.device_bytes = Gauge("haq_device_expert_bytes", "expert bytes resident on the device (peak)",
                                  registry=r)
        self.ttft = Histogram("haq_time_to_first_token_seconds", "arrival to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("haq_inter_token_latency_seconds", "between consecutive tokens of a request",
                             registry=r, buckets=LATENCY_BUCKETS)

    def observe_step(self, generator, engine, waiting: int) -> None:
        self.queue_depth.set(waiting)
        rows = generator.last_step.decode_rows
        self.batch_size.set(rows)
        if rows:
            self.batch_hist.observe(rows)
        if engine is not None:
            self.expert_calls.set(sum(engine.calls))
            self.expert_hits.set(sum(engine.hits))
            self.expert_cpu_calls.set(engine.cpu_calls)
            calls = max(sum(engine.calls), 1)
            self.hit_rate.set(sum(engine.hits) / calls)
            self.cpu_share.set(engine.cpu_calls / calls)
            self.bytes_moved.set(engine.copies * engine.expert_bytes)
            self.device_bytes.set(engine.peak_expert_bytes)
