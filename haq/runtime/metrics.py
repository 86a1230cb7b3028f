"""What an engine run reports (`Engine.generate_batch`), and its summary for `haq run`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch


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
