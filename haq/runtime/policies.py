"""Offloading policies: per expert call, run on the CPU or the device, copy or not, cache or not.

A policy sees one expert call at a time (`decide(key, n, view)`) and answers with a Decision; it
keeps its own cache bookkeeping. It never reads a clock: what it needs to know about queued work
and copies in flight comes through `ExecView`, which the simulator implements with a modelled
timeline and the engine with its own queues and CUDA events. So the same objects drive both.
The executor presents a layer's calls largest n first (decode: in routing order).

  all-cpu          every call on the CPU (no device experts)
  transfer-always  copy every expert for every call, compute on the device, keep nothing
  lru              mixtral-offloading: per-layer LRU of k slots, copy on a miss, compute on device
  fiddler          Fiddler's method re-profiled: one global popularity ranking from the profile;
                   a miss runs on the CPU when n * t_cpu(1) < t_copy + t_dev(1) (Fiddler's linear
                   cost rule), else is copied for the call and not kept
  fiddler-list     the same with a given ranking (`PolicyContext.ranking`), e.g. the list Fiddler
                   ships for Mixtral-8x7B (`haq.runtime.synthetic.load_fiddler_ranking`)
  llamacpp         llama.cpp --n-cpu-moe: the first layers' experts live on the CPU, the others all
                   on the device; CPU-layer calls with >= 32 tokens are copied for the call (op offload)
  haq              two-stage placement pinned (`pin_share` of the budget, tuned per budget on the
                   profile by `haq.sim.tuning.tune_shares`, with stage 1's path share when it
                   prefetches) + LRU for the rest; the predictor
                   picks CPU / copy per call (list-scheduling a layer's calls over CPU and link)
                   and admits background copies when their expected reuse repays them; prefetches
                   the likely experts of a later layer into idle link time (`Haq.prefetch`)
  belady           oracle: copy on a miss, compute on device, evict (or bypass) by the farthest
                   next use in the future call sequence; an upper bound on demand-cache hit rate
"""
from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from haq.errors import HaqError
from haq.runtime.cache import ExpertCache, Key, PerLayerLRU
from haq.runtime.placement import (
    ProfileStats,
    global_popularity_placement,
    ranking_from_frequencies,
)
from haq.runtime.predictor import CostPredictor, Decision

PolicyName = Literal["all-cpu", "transfer-always", "lru", "fiddler", "fiddler-list", "llamacpp", "haq", "belady"]
LLAMACPP_OFFLOAD_BATCH = 32  # ggml CUDA backend: ops with batch >= 32 run on the GPU, weights copied over


class ExecView(Protocol):
    """What a policy may ask the executor about queued work."""

    def link_backlog_s(self) -> float:
        """Seconds until the host -> device copies already queued are done."""
        ...

    def cpu_backlog_s(self) -> float:
        """Predicted seconds of CPU expert work already assigned in the current layer."""
        ...

    def ready_in_s(self, key: Key) -> float:
        """Seconds until the copy of `key` lands (0 if it has landed or was never copied)."""
        ...

    def copied_ahead(self, key: Key) -> bool:
        """Whether a `Policy.prefill_ahead` copy of `key` sits in a staging buffer for this layer."""
        ...


@dataclass(frozen=True, slots=True)
class Prefetch:
    """A background copy a policy starts before the call that needs it; already admitted."""

    key: Key
    evicted: tuple[Key, ...] = ()  # cache entries the admission pushed out (the executor frees them)


class Policy(Protocol):
    name: str

    def decide(self, key: Key, n: int, view: ExecView) -> Decision: ...

    def prefetch(self, layer: int, probs: np.ndarray, view: ExecView, lead_s: float) -> list[Prefetch]:
        """Copies to start now for `layer`, whose calls are expected in about `lead_s` seconds;
        `probs` [E]: each expert's probability of being called there (a path or pre-gate
        prediction). The executor enqueues them on the link in order, after the copies it has."""
        ...

    def prefill_ahead(self, layer: int, tokens: int, view: ExecView, lead_s: float) -> list[Key]:
        """Prefill, pipelined: copies of `layer`'s experts to start now, during the layer before it,
        into staging buffers (not kept), for a batch of `tokens` tokens whose calls there come in about
        `lead_s` seconds. The executor queues them after its own copies, frees the buffers when the
        layer is done, and answers `ExecView.copied_ahead` for them meanwhile."""
        ...

    def preload(self) -> list[Key]:
        """Experts the executor copies to the device before serving (startup, not on the clock)."""
        ...

    def resident_bytes(self) -> int:
        """Device bytes held by cached expert weights now (staging buffers excluded)."""
        ...


@dataclass(frozen=True)
class PolicyContext:
    """Everything a policy may be built from: sizes, the cost model and profile statistics."""

    budget_bytes: int
    expert_bytes: int
    predictor: CostPredictor
    stats: ProfileStats  # from the profile part of the trace, never the replayed part
    ranking: list[Key] | None = None  # the ranking fiddler-list places (most popular first)
    future: list[Key] | None = None  # every call's key in replay order; only belady reads it
    pin_share: float = 0.5  # haq: share of the budget pinned by placement, the rest is LRU
    path_share: float = 0.0  # haq: share of the pinned slots spent on path coverage (stage 1)
    prefetch: bool = True  # haq: copy the predicted experts of later layers into idle link time
    pipeline: bool = True  # haq: in prefill, copy the next layer's experts while a layer runs (`prefill_ahead`)

    @property
    def slots(self) -> int:
        return self.budget_bytes // self.expert_bytes

    @property
    def layers(self) -> int:
        return self.stats.layers

    @property
    def num_experts(self) -> int:
        return self.stats.num_experts


class NoPrefetch:
    """Policies that copy an expert only when a call asks for it."""

    def prefetch(self, layer: int, probs: np.ndarray, view: ExecView, lead_s: float) -> list[Prefetch]:
        return []

    def prefill_ahead(self, layer: int, tokens: int, view: ExecView, lead_s: float) -> list[Key]:
        return []


_REGISTRY: dict[str, Callable[[PolicyContext], Policy]] = {}


def register(name: str):
    def wrap(factory):
        _REGISTRY[name] = factory
        return factory
    return wrap


def make_policy(name: str, ctx: PolicyContext) -> Policy:
    """The named policy; under a budget smaller than one expert every call runs on the CPU, since
    even a copy made for one call would hold device bytes the budget does not have."""
    if name not in _REGISTRY:
        raise HaqError(f"unknown policy {name!r}; choose from {sorted(_REGISTRY)}")
    policy = _REGISTRY[name](ctx)  # built either way: its own checks (a ranking it needs) still apply
    if ctx.budget_bytes < ctx.expert_bytes:
        policy = AllCpu(ctx)
        policy.name = name
    return policy


def policy_names() -> list[str]:
    return list(_REGISTRY)


@register("all-cpu")
class AllCpu(NoPrefetch):
    name = "all-cpu"

    def __init__(self, ctx: PolicyContext) -> None:
        self.predictor = ctx.predictor

    def decide(self, key: Key, n: int, view: ExecView) -> Decision:
        return Decision("cpu", transfer=False, admit=False, est_s=self.predictor.t_cpu(n))

    def preload(self) -> list[Key]:
        return []

    def resident_bytes(self) -> int:
        return 0


@register("transfer-always")
class TransferAlways(NoPrefetch):
    name = "transfer-always"

    def __init__(self, ctx: PolicyContext) -> None:
        self.predictor = ctx.predictor

    def decide(self, key: Key, n: int, view: ExecView) -> Decision:
        p = self.predictor
        return Decision("device", transfer=True, admit=False,
                        est_s=view.link_backlog_s() + p.t_transfer() + p.t_device(n))

    def preload(self) -> list[Key]:
        return []

    def resident_bytes(self) -> int:
        return 0


@register("lru")
class PerLayerLru(NoPrefetch):
    name = "lru"

    def __init__(self, ctx: PolicyContext) -> None:
        self.predictor = ctx.predictor
        self.expert_bytes = ctx.expert_bytes
        self.cache = PerLayerLRU.from_budget(ctx.budget_bytes, ctx.layers, ctx.expert_bytes)

    def decide(self, key: Key, n: int, view: ExecView) -> Decision:
        p = self.predictor
        if self.cache.lookup(key):
            return Decision("device", transfer=False, admit=False, est_s=view.ready_in_s(key) + p.t_device(n))
        evicted = self.cache.admit(key, self.expert_bytes)
        return Decision("device", transfer=True, admit=key in self.cache,
                        est_s=view.link_backlog_s() + p.t_transfer() + p.t_device(n), evicted=tuple(evicted))

    def preload(self) -> list[Key]:
        return []  # mixtral-offloading starts cold

    def resident_bytes(self) -> int:
        return self.cache.used_bytes


@register("fiddler")
class Fiddler(NoPrefetch):
    name = "fiddler"

    def __init__(self, ctx: PolicyContext, ranking: list[Key] | None = None) -> None:
        self.predictor = ctx.predictor
        pinned = global_popularity_placement(ranking or ranking_from_frequencies(ctx.stats.freq), ctx.slots)
        self.cache = ExpertCache(ctx.budget_bytes, {k: ctx.expert_bytes for k in pinned})
        # Fiddler's cost model: CPU time linear in tokens, copy + device time constant
        self.cpu_per_token = ctx.predictor.t_cpu(1)
        self.copy_and_run = ctx.predictor.t_transfer() + ctx.predictor.t_device(1)

    def decide(self, key: Key, n: int, view: ExecView) -> Decision:
        p = self.predictor
        if self.cache.lookup(key):
            return Decision("device", transfer=False, admit=False, est_s=p.t_device(n))
        if n * self.cpu_per_token < self.copy_and_run:
            return Decision("cpu", transfer=False, admit=False, est_s=p.t_cpu(n))
        return Decision("device", transfer=True, admit=False,
                        est_s=view.link_backlog_s() + p.t_transfer() + p.t_device(n))

    def preload(self) -> list[Key]:
        return sorted(self.cache.pinned)

    def resident_bytes(self) -> int:
        return self.cache.used_bytes


@register("fiddler-list")
class FiddlerList(Fiddler):
    name = "fiddler-list"

    def __init__(self, ctx: PolicyContext) -> None:
        if ctx.ranking is None:
            raise HaqError("policy fiddler-list needs a ranking (for Mixtral-8x7B: "
                           "ranking=haq.runtime.synthetic.load_fiddler_ranking())")
        super().__init__(ctx, ctx.ranking)


@register("llamacpp")
class LlamaCpp(NoPrefetch):
    name = "llamacpp"

    def __init__(self, ctx: PolicyContext) -> None:
        self.predictor = ctx.predictor
        full_layers = min(ctx.layers, ctx.budget_bytes // (ctx.num_experts * ctx.expert_bytes))
        self.n_cpu_moe = ctx.layers - full_layers  # --n-cpu-moe: the first layers stay on the CPU
        self.num_experts = ctx.num_experts
        self.layers = ctx.layers
        self._resident = full_layers * ctx.num_experts * ctx.expert_bytes

    def decide(self, key: Key, n: int, view: ExecView) -> Decision:
        p = self.predictor
        if key[0] >= self.n_cpu_moe:
            return Decision("device", transfer=False, admit=False, est_s=p.t_device(n))
        if n >= LLAMACPP_OFFLOAD_BATCH:
            return Decision("device", transfer=True, admit=False,
                            est_s=view.link_backlog_s() + p.t_transfer() + p.t_device(n))
        return Decision("cpu", transfer=False, admit=False, est_s=p.t_cpu(n))

    def preload(self) -> list[Key]:
        return [(layer, e) for layer in range(self.n_cpu_moe, self.layers) for e in range(self.num_experts)]

    def resident_bytes(self) -> int:
        return self._resident


@register("belady")
class Belady(NoPrefetch):
    name = "belady"

    def __init__(self, ctx: PolicyContext) -> None:
        if ctx.future is None:
            raise HaqError("the belady oracle needs the future call sequence (PolicyContext.future)")
        self.predictor = ctx.predictor
        self.expert_bytes = ctx.expert_bytes
        self.future = ctx.future
        self.capacity = ctx.slots
        # next_use[i]: index of the next call of the same key after call i (len(future) if none)
        self.next_use = np.full(len(self.future), len(self.future), dtype=np.int64)
        last: dict[Key, int] = {}
        for i in range(len(self.future) - 1, -1, -1):
            self.next_use[i] = last.get(self.future[i], len(self.future))
            last[self.future[i]] = i
        self.i = 0
        self.resident: dict[Key, int] = {}  # key -> its next use
        self.heap: list[tuple[int, Key]] = []  # (-next use, key), stale entries skipped lazily

    def decide(self, key: Key, n: int, view: ExecView) -> Decision:
        if self.future[self.i] != key:
            raise HaqError(f"belady replay diverged at call {self.i}: expected {self.future[self.i]}, got {key}")
        nxt = int(self.next_use[self.i])
        self.i += 1
        p = self.predictor
        hit = key in self.resident
        evicted: list[Key] = []
        keep = hit
        if not hit and self.capacity > 0:
            if len(self.resident) < self.capacity:
                keep = True
            else:
                far_next, far_key = self._farthest()
                if far_next > nxt:  # evict the farthest; else bypass (the newcomer is needed last)
                    del self.resident[far_key]
                    heapq.heappop(self.heap)
                    evicted.append(far_key)
                    keep = True
        if keep:
            self.resident[key] = nxt
            heapq.heappush(self.heap, (-nxt, key))
        if hit:
            return Decision("device", transfer=False, admit=False, est_s=view.ready_in_s(key) + p.t_device(n))
        return Decision("device", transfer=True, admit=keep,
                        est_s=view.link_backlog_s() + p.t_transfer() + p.t_device(n), evicted=tuple(evicted))

    def preload(self) -> list[Key]:
        return []  # the oracle starts cold, like the demand caches it bounds

    def _farthest(self) -> tuple[int, Key]:
        while True:
            neg, key = self.heap[0]
            if self.resident.get(key) == -neg:
                return -neg, key
            heapq.heappop(self.heap)

    def resident_bytes(self) -> int:
        return len(self.resident) * self.expert_bytes


from haq.runtime import haq_policy  # noqa: E402,F401  (registers "haq"; it builds on the names above)
