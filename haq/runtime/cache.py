"""The device expert cache: which (layer, expert) weights live on the device, under a byte budget.

Bookkeeping only: keys, sizes and recency. The engine owns the actual device buffers and frees the
slots of the keys `admit` reports as evicted; the simulator owns none. Pinned entries (the static
placement) are never evicted; the rest of the budget is LRU.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from haq.errors import HaqError

Key = tuple[int, int]  # (layer, expert)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    admissions: int = 0
    refused: int = 0  # admissions turned down: the item cannot fit even with every unpinned entry gone

    @property
    def hit_rate(self) -> float:
        calls = self.hits + self.misses
        return self.hits / calls if calls else 0.0

    def __add__(self, other: CacheStats) -> CacheStats:
        return CacheStats(self.hits + other.hits, self.misses + other.misses, self.evictions + other.evictions,
                          self.admissions + other.admissions, self.refused + other.refused)


class ExpertCache:
    """LRU over (layer, expert) keys under `budget_bytes`, with pinned entries that never leave.

    `budget_setting` names the user-facing knob in errors (the CLI passes "--gpu-budget").
    """

    def __init__(self, budget_bytes: int, pinned: Mapping[Key, int] | None = None,
                 budget_setting: str = "gpu_budget") -> None:
        pinned = dict(pinned or {})
        pinned_bytes = sum(pinned.values())
        if pinned_bytes > budget_bytes:
            raise HaqError(f"the pinned experts need {pinned_bytes / 2**20:.1f} MiB but {budget_setting} is "
                           f"{budget_bytes / 2**20:.1f} MiB; raise {budget_setting} or pin fewer experts")
        self.budget_bytes = int(budget_bytes)
        self.pinned: dict[Key, int] = pinned
        self.pinned_bytes = pinned_bytes
        self._lru: OrderedDict[Key, int] = OrderedDict()  # least recently used first
        self._lru_bytes = 0
        self.stats = CacheStats()

    @property
    def used_bytes(self) -> int:
        return self.pinned_bytes + self._lru_bytes

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes

    def __contains__(self, key: Key) -> bool:
        """Membership without counting or touching recency."""
        return key in self.pinned or key in self._lru

    def __len__(self) -> int:
        return len(self.pinned) + len(self._lru)

    def lru_keys(self) -> list[Key]:
        """Unpinned keys, least recently used first."""
        return list(self._lru)

    def lookup(self, key: Key) -> bool:
        """Is `key` resident? Counts a hit or a miss and marks it most recently used."""
        if key in self.pinned:
            self.stats.hits += 1
            return True
        if key in self._lru:
            self._lru.move_to_end(key)
            self.stats.hits += 1
            return True
        self.stats.misses += 1
        return False

    def admit(self, key: Key, nbytes: int) -> list[Key]:
        """Make `key` resident, evicting least recently used unpinned keys; returns the evicted keys.

        Refused (nothing evicted, nothing admitted, `stats.refused` counts it) when `nbytes` exceeds
        what the unpinned part of the budget could ever hold; check `key in cache` when it matters.
        """
        if key in self:
            if key in self._lru:
                self._lru.move_to_end(key)
            return []
        if nbytes > self.budget_bytes - self.pinned_bytes:
            self.stats.refused += 1
            return []
        evicted: list[Key] = []
        while self.free_bytes < nbytes:
            old, size = self._lru.popitem(last=False)
            self._lru_bytes -= size
            evicted.append(old)
        self._lru[key] = nbytes
        self._lru_bytes += nbytes
        self.stats.admissions += 1
        self.stats.evictions += len(evicted)
        return evicted

    def next_victim(self, nbytes: int) -> Key | None:
        """The first key `admit(key, nbytes)` would evict now, None when nothing would go."""
        if self.free_bytes >= nbytes:
            return None
        return next(iter(self._lru), None)

    def victims(self, nbytes: int) -> list[Key]:
        """The keys `admit(key, nbytes)` would evict now (a dry run, for admission decisions)."""
        out, free = [], self.free_bytes
        for old, size in self._lru.items():
            if free >= nbytes:
                break
            out.append(old)
            free += size
        return out


class PerLayerLRU:
    """mixtral-offloading's cache: every layer keeps its own `slots` experts, LRU within the layer."""

    def __init__(self, layers: int, slots: int, expert_bytes: int) -> None:
        self.slots = slots
        self.expert_bytes = expert_bytes
        self.layers = [ExpertCache(slots * expert_bytes) for _ in range(layers)]

    @classmethod
    def from_budget(cls, budget_bytes: int, layers: int, expert_bytes: int) -> PerLayerLRU:
        """floor(budget / (layers * expert_bytes)) slots per layer; leftover bytes stay unused."""
        return cls(layers, budget_bytes // (layers * expert_bytes), expert_bytes)

    @property
    def stats(self) -> CacheStats:
        total = CacheStats()
        for cache in self.layers:
            total = total + cache.stats
        return total

    @property
    def used_bytes(self) -> int:
        return sum(c.used_bytes for c in self.layers)

    def __contains__(self, key: Key) -> bool:
        return key in self.layers[key[0]]

    def lookup(self, key: Key) -> bool:
        return self.layers[key[0]].lookup(key)

    def admit(self, key: Key, nbytes: int) -> list[Key]:
        return self.layers[key[0]].admit(key, nbytes)
