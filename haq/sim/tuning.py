"""The simulator's front: haq's pin and path shares tuned by replaying the profile, the policy context an
executor needs (the engine gets its own from here), and `simulate`, which runs every policy over a
trace's replay part on the timeline of :mod:`haq.sim.timeline` and formats the comparison."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from haq.errors import HaqError
from haq.runtime.cache import Key
from haq.runtime.hardware import HardwareProfile
from haq.runtime.placement import ProfileStats, profile_statistics
from haq.runtime.policies import PolicyContext, PolicyName, make_policy
from haq.runtime.predictor import CostPredictor
from haq.runtime.trace import Trace, split_by_sequence
from haq.sim.lookahead import PrefetchSource, lookahead_for
from haq.sim.timeline import SimResult, replay_steps, run_policy, summarize


def _context(stats: ProfileStats, budget: int, expert_bytes: int, predictor: CostPredictor, *,
             pin_share: float, path_share: float, ranking: list[Key] | None = None,
             future: list[Key] | None = None, prefetch: bool = True, pipeline: bool = True) -> PolicyContext:
    return PolicyContext(budget_bytes=int(budget), expert_bytes=expert_bytes, predictor=predictor, stats=stats,
                         ranking=ranking, future=future, pin_share=pin_share, path_share=path_share,
                         prefetch=prefetch, pipeline=pipeline)


PIN_SHARES = (1.0, 0.75, 0.5, 0.25)
STABLE_WITHIN = 0.01  # relative: among shares this close to the fastest, the steadiest per-layer hit rate wins


PATH_SHARES = (0.0, 0.25)  # stage 1's share of the pinned slots, tried when haq prefetches


def tune_shares(profile_trace: Trace, predictor: CostPredictor, budgets: Sequence[int], expert_bytes: int, *,
                nonexpert_bytes_per_layer: int = 0, prefill_tokens: int = 0, decode_batch: int = 1,
                path_window: int = 2, path_share: float | None = None, candidates: Sequence[float] = PIN_SHARES,
                prefetch: PrefetchSource = "auto") -> list[tuple[float, float]]:
    """haq's (pin_share, path_share) for each budget, chosen on the profile part only.

    Whether the unpinned part should hold recently used experts (an LRU fed by background copies)
    or more static placement depends on the workload's temporal locality, which placement
    statistics alone do not settle; so each candidate is replayed: statistics from the first half
    of the profile's sequences, time measured on the second half. Stage 1 (whole paths) can only
    pay when experts are fetched along paths, so `path_share` None tries PATH_SHARES when haq
    prefetches and 0 otherwise. Among the candidates within STABLE_WITHIN of the fastest replayed
    time, the one whose per-layer hit rates spread least relative to their mean (std / mean over
    layers; no hits at all counts as the worst) wins: the pin share barely moves the mean latency
    (every share within ~1.5% on the traces of bench/results/policy-tradeoff.md) but moves the
    spread several-fold, and steady per-layer hit rates keep each layer's latency predictable.
    Relative, so that where hits save no time (a device that is the host) fewer hits everywhere
    do not pass for steadiness. Exact ties go to the larger pin share and the smaller path share;
    a budget that holds every expert pins them all.
    """
    if len(profile_trace.sequences()) >= 2:
        stats_part, score_part = split_by_sequence(profile_trace, 0.5)
    else:
        stats_part = score_part = profile_trace  # one sequence: score in-sample
    steps = replay_steps(score_part, prefill_tokens, decode_batch)
    stats = profile_statistics(stats_part, path_window)
    lookahead = lookahead_for(prefetch, stats_part, score_part)
    paths = [path_share] if path_share is not None else PATH_SHARES if lookahead is not None else [0.0]
    chosen = []
    for budget in budgets:
        if budget >= stats.layers * stats.num_experts * expert_bytes:
            chosen.append((max(candidates), min(paths)))
            continue
        scored = []  # (time, layer hit-rate std / mean, share, path), in preference order for exact ties
        for share in sorted(candidates, reverse=True):
            for path in sorted(paths):
                ctx = _context(stats, budget, expert_bytes, predictor, pin_share=share, path_share=path,
                               prefetch=lookahead is not None)
                replay = run_policy(make_policy("haq", ctx), steps, predictor, stats.layers,
                                    nonexpert_bytes_per_layer, lookahead=lookahead)
                rates = replay.hits_per_layer / np.maximum(replay.calls_per_layer, 1)
                spread = float(rates.std() / rates.mean()) if rates.mean() > 0 else float("inf")
                scored.append((float(replay.step_latency.sum()), spread, share, path))
        fastest = min(t for t, *_ in scored)
        steady = min((c for c in scored if c[0] <= fastest * (1 + STABLE_WITHIN)), key=lambda c: c[1])
        chosen.append((steady[2], steady[3]))
    return chosen


def policy_context(profile_trace: Trace, budget_bytes: int, expert_bytes: int, predictor: CostPredictor, *,
                   pin_share: float | None = None, path_share: float | None = None, path_window: int = 2,
                   ranking: list[Key] | None = None, nonexpert_bytes_per_layer: int = 0,
                   prefill_tokens: int = 0) -> PolicyContext:
    """What `make_policy` needs, from a profile trace; for executors other than `simulate` (the engine).

    pin_share None: haq's shares are tuned on the profile trace (`tune_shares`, a few replays);
    path_share None: tuned with it when haq prefetches, else 0.
    """
    if pin_share is None:
        pin_share, path_share = tune_shares(profile_trace, predictor, [budget_bytes], expert_bytes,
                                            path_window=path_window, path_share=path_share,
                                            nonexpert_bytes_per_layer=nonexpert_bytes_per_layer,
                                            prefill_tokens=prefill_tokens)[0]
    path_share = path_share or 0.0
    return _context(profile_statistics(profile_trace, path_window), budget_bytes, expert_bytes, predictor,
                    pin_share=pin_share, path_share=path_share, ranking=ranking)


def simulate(
    trace: Trace,
    profile: HardwareProfile,
    budget_bytes: int | Sequence[int],
    expert_bytes: int,
    policies: Sequence[PolicyName],
    *,
    flops_per_token: float | None = None,
    nonexpert_bytes_per_layer: int = 0,
    nonexpert_s_per_layer: float | None = None,
    prefill_tokens: int = 0,
    decode_batch: int = 1,
    profile_trace: Trace | None = None,
    profile_frac: float = 0.5,
    path_window: int = 2,
    pin_share: float | None = None,
    path_share: float | None = None,
    ranking: list[Key] | None = None,
    prefetch: PrefetchSource = "auto",
    pipeline: bool = True,
) -> list[SimResult]:
    """One SimResult per (budget, policy), budgets in the outer loop.

    Without `profile_trace` the trace is split by sequence (`profile_frac` of the sequences build the
    placement statistics, the rest is replayed). `ranking` is what policy fiddler-list places
    (e.g. `load_fiddler_ranking()` for Mixtral-8x7B). `nonexpert_s_per_layer`, when measured
    (`haq.runtime.profile_hw.measure_overhead_s_per_layer`: attention, router and dispatch), replaces the bytes-derived time of
    the non-expert part of a layer. `prefill_tokens` and `decode_batch`: see `replay_steps`. haq's
    `pin_share` and its stage-1 `path_share` are tuned per budget on the profile part when None
    (`tune_shares`; a given pin share without a path share means 0). `prefetch`: where haq's
    predictions come from (`lookahead_for`; "off": no prefetch). `pipeline`: haq's prefill copies a
    layer ahead (`Policy.prefill_ahead`); off, the shares are still tuned with it, so a replay
    with and one without differ by the pipelining alone.
    """
    if profile_trace is None:
        profile_trace, trace = split_by_sequence(trace, profile_frac)
    if (profile_trace.meta.layers, profile_trace.meta.num_experts) != (trace.meta.layers, trace.meta.num_experts):
        raise HaqError("profile trace and replayed trace come from different model shapes")
    L, E = trace.meta.layers, trace.meta.num_experts
    predictor = CostPredictor(profile, expert_bytes, flops_per_token)
    steps = replay_steps(trace, prefill_tokens, decode_batch)
    future = [(layer, e) for st in steps for layer in range(L) for e, _ in st.calls[layer]]
    stats = profile_statistics(profile_trace, path_window)
    budgets = [int(budget_bytes)] if np.ndim(budget_bytes) == 0 else [int(b) for b in budget_bytes]
    if min(budgets) < 0:
        raise HaqError(f"budgets must be >= 0 bytes, got {min(budgets)}")
    if pin_share is not None or "haq" not in policies:
        shares = [(PIN_SHARES[0] if pin_share is None else pin_share, path_share or 0.0)] * len(budgets)
    else:
        shares = tune_shares(profile_trace, predictor, budgets, expert_bytes, prefill_tokens=prefill_tokens,
                             decode_batch=decode_batch, nonexpert_bytes_per_layer=nonexpert_bytes_per_layer,
                             path_window=path_window, path_share=path_share, prefetch=prefetch)
    lookahead = lookahead_for(prefetch, profile_trace, trace)
    rows = []
    for budget, (share, path) in zip(budgets, shares):
        ctx = _context(stats, budget, expert_bytes, predictor, pin_share=share, path_share=path,
                       ranking=ranking, future=future, prefetch=lookahead is not None, pipeline=pipeline)
        for name in policies:
            replay = run_policy(make_policy(name, ctx), steps, predictor, L, nonexpert_bytes_per_layer,
                                nonexpert_s_per_layer, lookahead)
            row = summarize(name, replay, steps, budget, L * E * expert_bytes, expert_bytes,
                            L * nonexpert_bytes_per_layer, profile)
            if name == "haq":
                source = f"{lookahead.source} at +{lookahead.distance}" if lookahead else "off"
                row.detail = f"pin_share={ctx.pin_share}, path_share={ctx.path_share}, prefetch={source}"
            rows.append(row)
    return rows


def format_table(rows: Sequence[SimResult]) -> str:
    """Markdown table, one line per result."""
    head = ("| policy | budget | hit rate | layer hit std | CPU share | MB moved/token | latency mean ms | "
            "std ms | p50 ms | p99 ms | tokens/s | device GiB | fits |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        name = f"{r.policy} ({r.detail})" if r.detail else r.policy
        lines.append(
            f"| {name} | {r.budget_frac:.0%} | {r.hit_rate:.3f} | {r.layer_hit_std:.3f} | {r.cpu_share:.3f} | "
            f"{r.bytes_moved_per_token / 1e6:.3g} | {r.latency_mean_s * 1e3:.1f} | {r.latency_std_s * 1e3:.1f} | "
            f"{r.latency_p50_s * 1e3:.1f} | {r.latency_p99_s * 1e3:.1f} | {r.tokens_per_s:.2f} | "
            f"{r.device_bytes / 2**30:.3g} | {'yes' if r.fits_device else 'no'} |")
    return "\n".join(lines)
