"""What an engine run reports (`Engine.generate_batch`), and its summary for `haq run`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from haq.runtime.engine import Engine


@dataclass
class EngineMetrics:
    policy: str
    budget_bytes: int
    expert_bytes: int
    total_expert_bytes: int
    calls: int
    hit_rate: float
    layer_hit_rates: list[float]
    layer_hit_mean: float
    layer_hit_std: float
    cpu_share: float
    bytes_moved_per_token: float
    latency_mean_ms: float
    latency_std_ms: float
    latency_p50_ms: float
    latency_p99_ms: float
    ttft_ms: float
    tokens_per_s: float
    device_bytes: dict = field(default_factory=dict)
    token_latency_ms: list[float] = field(default_factory=list)
    cum_hit_rate: list[float] = field(default_factory=list)  # after each decode token, all calls so far
    pregate_accuracy: list[float] = field(default_factory=list)  # per layer: called experts pre-gated d layers early
    prefetches: int = 0
    prefetch_used: float = 0.0  # share of prefetched experts served on the device before eviction
    copies_ahead: int = 0  # prefill: copies of a layer's experts started during the layer before it

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        dev = self.device_bytes
        return (f"policy {self.policy}  budget {self.budget_bytes / 2**20:.1f} MiB  hit rate {self.hit_rate:.3f} "
                f"(per layer {self.layer_hit_mean:.3f} +- {self.layer_hit_std:.3f})  cpu share {self.cpu_share:.3f}\n"
                f"latency/token mean {self.latency_mean_ms:.2f} ms  std {self.latency_std_ms:.2f}  "
                f"p50 {self.latency_p50_ms:.2f}  p99 {self.latency_p99_ms:.2f}  ttft {self.ttft_ms:.1f} ms  "
                f"{self.tokens_per_s:.2f} tok/s  moved {self.bytes_moved_per_token / 2**20:.2f} MiB/token\n"
                f"device bytes: experts {dev.get('experts_peak', 0) / 2**20:.1f} MiB (peak), non-expert "
                f"{dev.get('non_expert', 0) / 2**20:.1f} MiB, KV {dev.get('kv_cache', 0) / 2**20:.2f} MiB"
                + self._prefetch_line())

    def _prefetch_line(self) -> str:
        scored = [a for a in self.pregate_accuracy if a > 0]
        if not scored:
            return ""
        return (f"\npre-gate accuracy {np.mean(scored):.3f} (layers it scored)  prefetches {self.prefetches}"
                f" ({self.prefetch_used:.0%} used)")


def kv_cache_bytes(cache) -> int:
    """Bytes of a KV cache object (its layers' keys and values); 0 for none."""
    if cache is None:
        return 0
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


def engine_metrics(engine: Engine, lat: np.ndarray, ttft: float, tokens: int, kv: int) -> EngineMetrics:
    """An engine run's metrics from its counters: `lat` the decode steps' seconds, `tokens` prompt + generated."""
    calls = sum(engine.calls)
    layer_rates = [h / c if c else 0.0 for h, c in zip(engine.hits, engine.calls)]
    non_expert = sum(t.numel() * t.element_size() for t in
                     list(engine.model.parameters()) + list(engine.model.buffers()))
    lat_ms = lat * 1000 if len(lat) else np.zeros(1)
    return EngineMetrics(
        policy=engine.policy_name, budget_bytes=engine.budget_bytes, expert_bytes=engine.expert_bytes,
        total_expert_bytes=engine.store.total_bytes, calls=calls, hit_rate=sum(engine.hits) / max(calls, 1),
        layer_hit_rates=layer_rates, layer_hit_mean=float(np.mean(layer_rates)),
        layer_hit_std=float(np.std(layer_rates)), cpu_share=engine.cpu_calls / max(calls, 1),
        bytes_moved_per_token=engine.copies * engine.expert_bytes / max(tokens, 1),
        latency_mean_ms=float(lat_ms.mean()), latency_std_ms=float(lat_ms.std()),
        latency_p50_ms=float(np.percentile(lat_ms, 50)), latency_p99_ms=float(np.percentile(lat_ms, 99)),
        ttft_ms=ttft * 1000, tokens_per_s=float(1000.0 / lat_ms.mean()) if lat_ms.mean() > 0 else 0.0,
        device_bytes={"experts_peak": engine.peak_expert_bytes, "budget": engine.budget_bytes,
                      "staging_peak": engine.peak_staging_bytes, "non_expert": non_expert, "kv_cache": kv,
                      "total": engine.peak_expert_bytes + engine.peak_staging_bytes + non_expert + kv},
        token_latency_ms=[round(float(x), 4) for x in lat_ms],
        pregate_accuracy=engine.pregate.accuracy(),
        prefetches=engine.prefetches, prefetch_used=engine.prefetch_hits / max(engine.prefetches, 1),
        copies_ahead=engine.copies_ahead,
    )
