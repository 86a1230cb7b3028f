"""Offloading policies: per expert call, run on the CPU or the device, copy or not, cache or not.

A policy sees one expert call at a time (`decide(key, n, link)`) and answers with a Decision; it
keeps its own cache bookkeeping. It never reads a clock: whatever it needs to know about copies in
flight comes through `LinkView`, which the simulator implements with a modelled timeline and the
engine with CUDA events. So the same objects drive both executors.

  all-cpu          every call on the CPU (no device experts)
  transfer-always  copy every expert for every call, compute on the device, keep nothing
  lru              mixtral-offloading: per-layer LRU of k slots, copy on a miss, compute on device
  fiddler          Fiddler: static global-popularity placement; a miss runs where the cost model
                   says (CPU in decode, copy without keeping it for large batches)
  llamacpp         llama.cpp --n-cpu-moe: the first layers' experts live on the CPU, the others all
                   on the device; CPU-layer calls with >= 32 tokens are copied for the call (op offload)
  haq              two-stage placement pinned + LRU for the rest; the predictor picks CPU / copy
                   per call and admits background copies when their expected reuse repays them
  belady           oracle: copy on a miss, compute on device, evict (or bypass) by the farthest
                   next use in the future call sequence; an upper bound on demand-cache hit rate
"""
from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, Protocol

import numpy as np

from haq.errors import HaqError
from haq.runtime.cache import ExpertCache, Key, PerLayerLRU
from haq.runtime.placement import Paths, global_popularity_placement, ranking_from_frequencies, two_stage_placement
from haq.runtime.predictor import CostPredictor, Decision

PolicyName = Literal["all-cpu", "transfer-always", "lru", "fiddler", "llamacpp", "haq", "belady"]
LLAMACPP_OFFLOAD_BATCH = 32  # ggml CUDA backend: ops with batch >= 32 run on the GPU, weights copied over


class LinkView(Protocol):
    """What a policy may ask about host -> device copies."""

    def backlog_s(self) -> float:
        """Seconds until the copies already queued are done."""
        ...

    def ready_in_s(self, key: Key) -> float:
        """Seconds until the copy of `key` lands (0 if it has landed or was never copied)."""
        ...


class Policy(Protocol):
    name: str

    def decide(self, key: Key, n: int, link: LinkView) -> Decision: ...

    def resident_bytes(self) -> int:
        """Device bytes held by cached expert weights now (staging buffers excluded)."""
        ...


@dataclass(frozen=True)
class PolicyContext:
    """Everything a policy may be built from: sizes, the cost model and profile statistics."""

    layers: int
    num_experts: int
    budget_bytes: int
    expert_bytes: int
    predictor: CostPredictor
    freq: np.ndarray  # [L, E] selection counts in the profile part of the trace
    profile_tokens: int
    paths: Paths
    ranking: list[Key] | None = None  # global popularity ranking for fiddler; None: from freq
    future: list[Key] | None = None  # every call's key in replay order; only belady reads it
    pin_share: float = 0.5  # haq: share of the budget pinned by placement, the rest is LRU
    path_share: float = 0.25  # haq: share of the pinned slots spent on path coverage (stage 1)

    @property
    def slots(self) -> int:
        return self.budget_bytes // self.expert_bytes


_REGISTRY: dict[str, Callable[[PolicyContext], Policy]] = {}


def register(name: str):
    def wrap(factory):
        _REGISTRY[name] = factory
        return factory
    return wrap


def make_policy(name: str, ctx: PolicyContext) -> Policy:
    if name not in _REGISTRY:
        raise HaqError(f"unknown policy {name!r}; choose from {sorted(_REGISTRY)}")
    return _REGISTRY[name](ctx)


def policy_names() -> list[str]:
    return list(_REGISTRY)


@register("all-cpu")
class AllCpu:
    name = "all-cpu"

    def __init__(self, ctx: PolicyContext) -> None:
        self.predictor = ctx.predictor

    def decide(self, key: Key, n: int, link: LinkView) -> Decision:
        return Decision("cpu", transfer=False, admit=False, est_s=self.predictor.t_cpu(n))

    def resident_bytes(self) -> int:
        return 0


@register("transfer-always")
class TransferAlways:
    name = "transfer-always"

    def __init__(self, ctx: PolicyContext) -> None:
        self.predictor = ctx.predictor

    def decide(self, key: Key, n: int, link: LinkView) -> Decision:
        p = self.predictor
        return Decision("device", transfer=True, admit=False,
                        est_s=link.backlog_s() + p.t_transfer() + p.t_device(n))

    def resident_bytes(self) -> int:
        return 0


@register("lru")
class PerLayerLru:
    name = "lru"

    def __init__(self, ctx: PolicyContext) -> None:
        self.predictor = ctx.predictor
        self.expert_bytes = ctx.expert_bytes
        self.cache = PerLayerLRU.from_budget(ctx.budget_bytes, ctx.layers, ctx.expert_bytes)

    def decide(self, key: Key, n: int, link: LinkView) -> Decision:
        p = self.predictor
        if self.cache.lookup(key):
            return Decision("device", transfer=False, admit=False, est_s=link.ready_in_s(key) + p.t_device(n))
        evicted = self.cache.admit(key, self.expert_bytes)
        return Decision("device", transfer=True, admit=key in self.cache,
                        est_s=link.backlog_s() + p.t_transfer() + p.t_device(n), evicted=tuple(evicted))

    def resident_bytes(self) -> int:
        return self.cache.used_bytes


class _StaticPlacement:
    """Pinned experts only; a miss runs where the cost model says and its copy is not kept."""

    name = "static"

    def __init__(self, ctx: PolicyContext, pinned: set[Key]) -> None:
        self.predictor = ctx.predictor
        self.cache = ExpertCache(ctx.budget_bytes, {k: ctx.expert_bytes for k in pinned})

    def decide(self, key: Key, n: int, link: LinkView) -> Decision:
        if self.cache.lookup(key):
            return self.predictor.decide(n, True)
        return replace(self.predictor.decide(n, False, link_backlog_s=link.backlog_s()), admit=False)

    def resident_bytes(self) -> int:
        return self.cache.used_bytes


@register("fiddler")
class Fiddler(_StaticPlacement):
    name = "fiddler"

    def __init__(self, ctx: PolicyContext) -> None:
        ranking = ctx.ranking if ctx.ranking is not None else ranking_from_frequencies(ctx.freq)
        super().__init__(ctx, global_popularity_placement(ranking, ctx.slots))


@register("llamacpp")
class LlamaCpp:
    name = "llamacpp"

    def __init__(self, ctx: PolicyContext) -> None:
        self.predictor = ctx.predictor
        full_layers = min(ctx.layers, ctx.budget_bytes // (ctx.num_experts * ctx.expert_bytes))
        self.n_cpu_moe = ctx.layers - full_layers  # --n-cpu-moe: the first layers stay on the CPU
        self._resident = full_layers * ctx.num_experts * ctx.expert_bytes

    def decide(self, key: Key, n: int, link: LinkView) -> Decision:
        p = self.predictor
        if key[0] >= self.n_cpu_moe:
            return Decision("device", transfer=False, admit=False, est_s=p.t_device(n))
        if n >= LLAMACPP_OFFLOAD_BATCH:
            return Decision("device", transfer=True, admit=False,
                            est_s=link.backlog_s() + p.t_transfer() + p.t_device(n))
        return Decision("cpu", transfer=False, admit=False, est_s=p.t_cpu(n))

    def resident_bytes(self) -> int:
        return self._resident


@register("haq")
class Haq:
    """Two-stage placement pinned, LRU for the rest, the cost predictor per call.

    Expected reuse of a background copy (what `CostPredictor.decide` weighs against its cost):
      reuse = H * (r[key] - r[victim])
    r: the key's share of all expert calls in the profile; victim: the LRU entry the copy would
    evict (r = 0 when a slot is free); H: calls an admitted entry is expected to stay cached, the LRU
    part's slots over the recent admissions per call.
    """

    name = "haq"

    def __init__(self, ctx: PolicyContext) -> None:
        self.predictor = ctx.predictor
        self.expert_bytes = ctx.expert_bytes
        pinned_slots = int(round(ctx.pin_share * ctx.slots))
        pinned = two_stage_placement(ctx.freq, ctx.paths, pinned_slots, ctx.path_share)
        self.cache = ExpertCache(ctx.budget_bytes, {k: ctx.expert_bytes for k in pinned})
        self.lru_slots = ctx.slots - len(pinned)
        self.rate = ctx.freq / max(ctx.freq.sum(), 1.0)  # [L, E] share of calls
        self.ema = 1.0 / (ctx.layers * ctx.num_experts * 20)  # smoothing over ~20 tokens of calls
        self.admit_rate = self.lru_slots * self.ema  # admissions per call, moving average

    def decide(self, key: Key, n: int, link: LinkView) -> Decision:
        p = self.predictor
        if key in self.cache:
            d = p.decide(n, True, ready_in_s=link.ready_in_s(key))
            if d.where == "device":
                self.cache.lookup(key)
            self._count(False)
            return d
        victims = self.cache.victims(self.expert_bytes)
        r_victim = self.rate[victims[0]] if victims else 0.0
        horizon = self.lru_slots / max(self.admit_rate, 1e-9)
        d = p.decide(n, False, link_backlog_s=link.backlog_s(), expected_reuse=horizon * (self.rate[key] - r_victim))
        if d.admit:
            evicted = self.cache.admit(key, self.expert_bytes)
            if key not in self.cache:
                d = replace(d, admit=False, transfer=d.where == "device")
            else:
                d = replace(d, evicted=tuple(evicted))
        self._count(d.admit)
        return d

    def _count(self, admitted: bool) -> None:
        self.admit_rate += self.ema * (float(admitted) - self.admit_rate)

    def resident_bytes(self) -> int:
        return self.cache.used_bytes


@register("belady")
class Belady:
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

    def decide(self, key: Key, n: int, link: LinkView) -> Decision:
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
            return Decision("device", transfer=False, admit=False, est_s=link.ready_in_s(key) + p.t_device(n))
        return Decision("device", transfer=True, admit=keep, est_s=link.backlog_s() + p.t_transfer() + p.t_device(n),
                        evicted=tuple(evicted))

    def _farthest(self) -> tuple[int, Key]:
        while True:
            neg, key = self.heap[0]
            if self.resident.get(key) == -neg:
                return -neg, key
            heapq.heappop(self.heap)

    def resident_bytes(self) -> int:
        return len(self.resident) * self.expert_bytes
