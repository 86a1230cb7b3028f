"""Static expert placement: which (layer, expert) weights to pin on the device, from a profile trace.

Profile statistics (from the profiling part of a trace, never the part that is scored):
  freq   [L, E]  how often each expert is selected per layer
  paths          top-k sets of a token over `window` consecutive layers, with counts
Placements are sets of (layer, expert) keys within a budget counted in expert slots (all experts of
an MoE model have one size, so slots = budget_bytes // expert_bytes).

haq's two-stage placement:
  stage 1: spend `path_share` of the slots on the experts that complete the most frequent paths,
           greedily by path count per newly placed expert (shared experts make later paths cheaper)
  stage 2: fill the rest one expert at a time, always in the layer whose covered routing mass
           (sum of placed freq / layer total, i.e. its expected hit rate) is lowest, taking that
           layer's most frequent unplaced expert: per-layer hit rates stay balanced.
`path_share` defaults to 0. When a token's latency is a sum of per-layer costs (the simulator's
timeline, and an engine without prefetch), its expectation depends only on each layer's own
placement, so covering whole paths cannot lower mean latency; on the synthetic Mixtral trace a
share of 0.25 cost 1-2%. Stage 1 is for executors where whole-path residency pays, such as
prefetching along paths: with prefetch, `haq.sim.tuning.tune_shares` tries it on the profile.
Balancing (stage 2) costs nothing measurable on Mixtral-like routing (within +-0.5% of one global
ranking) and keeps no layer starved.
Baselines: none, uniform first-k per layer, one global popularity ranking (Fiddler), per-layer top-k.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from haq.errors import HaqError
from haq.runtime.cache import Key
from haq.runtime.trace import Trace


def expert_frequencies(trace: Trace) -> np.ndarray:
    """[L, E] selection counts per layer (missing slots, -1, are not counted)."""
    L, E = trace.meta.layers, trace.meta.num_experts
    ex = trace.experts.astype(np.int64)  # [T, L, K]
    flat = (np.arange(L)[None, :, None] * E + ex)[ex >= 0]
    return np.bincount(flat, minlength=L * E).reshape(L, E).astype(np.float64)


@dataclass(frozen=True)
class Paths:
    """Distinct paths of `window` consecutive layers and how many tokens took each.

    start  [P]          first layer of the path
    experts [P, W, K]   the token's sorted top-k set in layers start .. start+W-1 (-1 = missing)
    counts [P]
    """

    window: int
    start: np.ndarray
    experts: np.ndarray
    counts: np.ndarray


def path_statistics(trace: Trace, window: int = 2) -> Paths:
    L = trace.meta.layers
    if not 1 <= window <= L:
        raise HaqError(f"path window must be in [1, {L}] layers, got {window}")
    ex = np.sort(trace.experts, axis=2)  # sets: order within top-k does not matter
    starts, sets, counts = [], [], []
    for s in range(L - window + 1):
        rows = ex[:, s:s + window, :].reshape(len(ex), -1)  # [T, W*K]
        uniq, cnt = np.unique(rows, axis=0, return_counts=True)
        starts.append(np.full(len(uniq), s))
        sets.append(uniq.reshape(len(uniq), window, -1))
        counts.append(cnt)
    K = trace.meta.top_k
    return Paths(
        window=window,
        start=np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64),
        experts=np.concatenate(sets) if sets else np.zeros((0, window, K), dtype=np.int16),
        counts=np.concatenate(counts).astype(np.float64) if counts else np.zeros(0),
    )


def consecutive_overlap(trace: Trace) -> np.ndarray:
    """[L] share of consecutive token pairs (same sequence) whose top-k sets share an expert.

    Comparable to the Mixtral paper's "first or second choice" repetition (random top-2 of 8: 0.46).
    """
    same = trace.seq_id[1:] == trace.seq_id[:-1]
    a, b = trace.experts[:-1][same], trace.experts[1:][same]  # [P, L, K]
    hit = (a[:, :, :, None] == b[:, :, None, :]) & (a[:, :, :, None] >= 0)
    return hit.any(axis=(2, 3)).mean(axis=0) if len(a) else np.zeros(trace.meta.layers)


def locality_excess(trace: Trace, max_lag: int = 32) -> np.ndarray:
    """[max_lag + 1, L] extra uses, within the next k tokens, of an expert a token just used.

    Row k: sum over lags 1..k of P(expert reused at t+lag | used at t) minus the same probability
    under routing independent over tokens (sum_e q_e^2 / sum_e q_e, q_e = P(e selected)); row 0 is 0.
    About 0 everywhere without temporal locality. It is what a just-used expert is worth, over the
    next k tokens, beyond its average rate.
    """
    L = trace.meta.layers
    T = trace.num_tokens
    q = expert_frequencies(trace) / max(T, 1)  # [L, E]
    base = (q ** 2).sum(axis=1) / np.maximum(q.sum(axis=1), 1e-12)
    excess = np.zeros((max_lag + 1, L))
    for k in range(1, max_lag + 1):
        same = trace.seq_id[k:] == trace.seq_id[:-k]
        if not same.any():
            excess[k:] = excess[k - 1]
            break
        a, b = trace.experts[:-k][same], trace.experts[k:][same]  # [P, L, K]
        reused = ((a[:, :, :, None] == b[:, :, None, :]).any(axis=3) & (a >= 0)).sum(axis=(0, 2))
        excess[k] = excess[k - 1] + reused / np.maximum((a >= 0).sum(axis=(0, 2)), 1) - base
    return excess


@dataclass(frozen=True)
class ProfileStats:
    """What placement and policies learn from a profile trace."""

    freq: np.ndarray  # [L, E] selection counts
    tokens: int
    paths: Paths
    locality: np.ndarray  # [lags + 1, L] locality_excess

    @property
    def layers(self) -> int:
        return int(self.freq.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.freq.shape[1])


def profile_statistics(trace: Trace, path_window: int = 2, max_lag: int = 32) -> ProfileStats:
    """All profile statistics of a trace (path windows longer than the model are clipped to it)."""
    return ProfileStats(freq=expert_frequencies(trace), tokens=trace.num_tokens,
                        paths=path_statistics(trace, min(path_window, trace.meta.layers)),
                        locality=locality_excess(trace, max_lag))


def _check_budget(budget_slots: int, L: int, E: int) -> int:
    if budget_slots < 0:
        raise HaqError(f"placement budget must be >= 0 expert slots, got {budget_slots}")
    return min(int(budget_slots), L * E)


def two_stage_placement(freq: np.ndarray, paths: Paths, budget_slots: int, path_share: float = 0.0) -> set[Key]:
    """haq placement (module docstring): path coverage first, then balanced per-layer frequency."""
    if not 0.0 <= path_share <= 1.0:
        raise HaqError(f"path_share must be in [0, 1], got {path_share}")
    L, E = freq.shape
    budget = _check_budget(budget_slots, L, E)
    placed = np.zeros(L * E + 1, dtype=bool)  # last entry: a dummy for missing (-1) slots, always "placed"
    placed[-1] = True

    left = int(path_share * budget)  # stage 1: complete the most frequent paths
    if left and len(paths.counts):
        _cover_paths(placed, paths, E, left)

    # stage 2: balanced fill by covered routing mass per layer
    grid = placed[:-1].reshape(L, E)
    mass = freq / np.maximum(freq.sum(axis=1, keepdims=True), 1e-12)
    covered = (mass * grid).sum(axis=1)
    for _ in range(budget - int(grid.sum())):
        open_layers = ~grid.all(axis=1)
        layer = int(np.argmin(np.where(open_layers, covered, np.inf)))
        expert = int(np.argmax(np.where(grid[layer], -1.0, mass[layer])))
        grid[layer, expert] = True
        covered[layer] += mass[layer, expert]
    return {(int(layer), int(e)) for layer, e in zip(*np.nonzero(grid))}


def _cover_paths(placed: np.ndarray, paths: Paths, E: int, left: int) -> None:
    """Stage 1, in place on `placed` [L*E + 1]: greedily by path count per newly placed expert."""
    P, W, K = paths.experts.shape
    layer_of = paths.start[:, None] + np.repeat(np.arange(W), K)[None, :]
    ex = paths.experts.reshape(P, W * K).astype(np.int64)
    idx = np.where(ex >= 0, layer_of * E + ex, len(placed) - 1)  # [P, W*K] flat keys; -1 -> the dummy
    while left > 0:
        new = (~placed[idx]).sum(axis=1)
        ok = (new > 0) & (new <= left)
        if not ok.any():
            return
        best = int(np.argmax(np.where(ok, paths.counts / np.maximum(new, 1), -1.0)))
        placed[idx[best]] = True
        left -= int(new[best])


def uniform_placement(layers: int, experts: int, budget_slots: int) -> set[Key]:
    """Experts 0..k-1 in every layer (profile-blind); leftover slots go to the first layers."""
    budget = _check_budget(budget_slots, layers, experts)
    k, extra = divmod(budget, layers)
    return {(layer, e) for layer in range(layers) for e in range(k + (layer < extra))}


def global_popularity_placement(ranking: list[Key], budget_slots: int) -> set[Key]:
    """Fiddler: the first `budget_slots` keys of one global ranking (most popular first)."""
    if budget_slots < 0:
        raise HaqError(f"placement budget must be >= 0 expert slots, got {budget_slots}")
    return set(ranking[:budget_slots])


def ranking_from_frequencies(freq: np.ndarray) -> list[Key]:
    """All keys by decreasing per-token selection rate (ties: lower layer, then lower expert)."""
    L, E = freq.shape
    order = np.argsort(-freq.ravel(), kind="stable")
    return [(int(i // E), int(i % E)) for i in order]


def per_layer_frequency_placement(freq: np.ndarray, budget_slots: int) -> set[Key]:
    """The floor(budget / L) most frequent experts of every layer, leftovers by global frequency."""
    L, E = freq.shape
    budget = _check_budget(budget_slots, L, E)
    k = budget // L
    order = np.argsort(-freq, axis=1, kind="stable")
    placed = {(layer, int(e)) for layer in range(L) for e in order[layer, :k]}
    for key in ranking_from_frequencies(freq):
        if len(placed) >= budget:
            break
        placed.add(key)
    return placed
