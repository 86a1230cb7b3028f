"""Trace-driven simulator: replay routing through a policy on a modelled machine.

The policies are the runtime's objects (`haq.sim.policies`); the machine is a HardwareProfile.
Nothing here runs a model: a trace says which experts each token calls, the profile says how long
each call and copy takes, and the timeline below adds them up.

Replay. The trace is split by sequence: the first part is the profile (placement statistics), the
rest is replayed, sequence by sequence. With `prefill_tokens` = P > 0 the first P tokens of each
sequence form one batch (each expert called once with the number of its tokens); the remaining
tokens are decoded one at a time (batch 1). Tokens of different sequences are never batched.

Timeline assumptions, per layer of a step (one decode token or one prefill batch):
  1. non-expert work (attention, router) runs on the device first: t_dev of the non-expert bytes;
  2. the policy then decides every expert call of the layer at once (the router output is known),
     in routing order in decode, largest n first in prefill; the simulator never overrides it;
  3. CPU calls run one after another on the CPU; device calls one after another on the device,
     resident ones first, copied ones when their copy lands; copies go one after another over the
     link (one FIFO copy queue, background copies included, shared with later layers and tokens);
  4. CPU and device work in parallel: the layer ends at max(CPU end + 2 link latencies for moving
     the activations there and back, device end); background copies do not hold the layer.
     Unless the profile's device is the host CPU itself (`device_is_host`, e.g. `haq profile-hw
     --device cpu`): then one set of cores does everything one after another, and the layer takes
     the sum of its CPU calls, device calls and copies;
  5. while copies are on the link, CPU weight streaming gets min(cpu bw, host bw - link bw): the
     link's DMA reads the same DRAM;
  6. lm_head, embeddings, sampling and attention over the KV cache are not modelled (identical
     across policies); device memory traffic of copies is ignored (a few % of device bandwidth).
  7. `Policy.preload()` experts are on the device before the clock starts.
Hit: a call served on the device from cached weights (no copy made for it; a background copy
still landing is waited for). Latency statistics are over decode tokens; prefill is TTFT.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from haq.errors import HaqError
from haq.runtime.cache import Key
from haq.runtime.hardware import HardwareProfile
from haq.runtime.placement import ProfileStats, profile_statistics
from haq.runtime.predictor import CostPredictor
from haq.runtime.trace import Trace, split_by_sequence
from haq.sim.policies import Policy, PolicyContext, PolicyName, make_policy


@dataclass(frozen=True)
class Step:
    """One forward pass: a decode token (tokens = 1) or a prefill batch."""

    tokens: int
    prefill: bool
    calls: list[list[tuple[int, int]]]  # per layer: (expert, tokens routed to it)


@dataclass
class SimResult:
    policy: str
    budget_bytes: int
    budget_frac: float  # of all expert bytes of the model
    calls: int
    hit_rate: float
    layer_hit_std: float  # std over layers of the per-layer hit rate
    cpu_share: float  # share of calls computed on the CPU
    bytes_moved_per_token: float  # host -> device expert bytes per replayed token (prefill included)
    latency_mean_s: float  # decode tokens only
    latency_std_s: float
    latency_p50_s: float
    latency_p99_s: float
    tokens_per_s: float  # decode
    ttft_mean_s: float | None  # prefill latency per sequence, when prefill is simulated
    device_bytes: int  # peak expert bytes resident (+ one staging buffer if copies are not kept) + non-expert
    fits_device: bool
    latency_s: np.ndarray = field(repr=False)  # [decode tokens]
    cum_hit_rate: np.ndarray = field(repr=False)  # [decode tokens] hit rate of all calls so far
    detail: str = ""  # policy settings worth showing (haq: its tuned pin share)


class SimView:
    """The modelled copy queue (FIFO) and CPU work of the current layer; the simulator's ExecView."""

    def __init__(self) -> None:
        self.now = 0.0
        self.free_at = 0.0  # when the link has sent everything queued
        self.cpu_assigned = 0.0  # predicted CPU seconds assigned in the current layer
        self.ready_at: dict[Key, float] = {}

    def link_backlog_s(self) -> float:
        return max(0.0, self.free_at - self.now)

    def cpu_backlog_s(self) -> float:
        return self.cpu_assigned

    def ready_in_s(self, key: Key) -> float:
        return max(0.0, self.ready_at.get(key, 0.0) - self.now)

    def enqueue(self, seconds: float, key: Key | None) -> float:
        self.free_at = max(self.now, self.free_at) + seconds
        if key is not None:
            self.ready_at[key] = self.free_at
        return self.free_at


def replay_steps(trace: Trace, prefill_tokens: int = 0) -> list[Step]:
    """The forward passes of a replay, in order (see the module docstring)."""
    L = trace.meta.layers
    steps: list[Step] = []
    bounds = np.flatnonzero(np.diff(trace.seq_id)) + 1
    for seq in np.split(trace.experts, bounds):  # [S, L, K] each
        head = min(prefill_tokens, len(seq))
        if head:
            calls = []
            for layer in range(L):
                ids, counts = np.unique(seq[:head, layer], return_counts=True)
                order = np.argsort(-counts, kind="stable")  # largest first: greedy list scheduling
                calls.append([(int(ids[i]), int(counts[i])) for i in order if ids[i] >= 0])
            steps.append(Step(tokens=head, prefill=True, calls=calls))
        for row in seq[head:].tolist():
            steps.append(Step(tokens=1, prefill=False, calls=[[(e, 1) for e in r if e >= 0] for r in row]))
    return steps


def _cpu_call_time(predictor: CostPredictor, n: int, start: float, link_free: float) -> float:
    """CPU call duration; while the link is busy (until `link_free`) weights stream at the shared bandwidth."""
    if link_free <= start:
        return predictor.t_cpu(n)
    times = predictor.times
    nbytes, bw, shared = times.expert_bytes, times.profile.cpu.mem_bw.value, times.cpu_bw_while_copying
    busy = link_free - start
    stream = nbytes / shared if busy * shared >= nbytes else busy + (nbytes - busy * shared) / bw
    return predictor.t_cpu(n) - nbytes / bw + stream


@dataclass
class Replay:
    """Raw counters of one policy's replay; `summarize` turns them into a SimResult."""

    hits_per_layer: np.ndarray  # [L]
    calls_per_layer: np.ndarray  # [L]
    cpu_calls: int
    copies: int
    staged: bool  # some copy was not kept: the device needs a staging buffer
    peak_resident_bytes: int
    step_latency: np.ndarray  # [steps] seconds
    step_hits: np.ndarray  # [steps]
    step_calls: np.ndarray  # [steps]


def run_policy(policy: Policy, steps: Sequence[Step], predictor: CostPredictor, layers: int,
               nonexpert_bytes_per_layer: int = 0, nonexpert_s_per_layer: float | None = None) -> Replay:
    """Replay `steps` through `policy` on the timeline of the module docstring."""
    prof = predictor.times.profile
    t_copy = predictor.t_transfer()
    t_cpu, t_dev = predictor.t_cpu, predictor.t_device
    act_roundtrip = 2 * prof.link.latency.value
    view = SimView()
    clock = 0.0
    hits_l, calls_l = [0] * layers, [0] * layers
    cpu_calls = copies = 0
    staged = False
    peak = policy.resident_bytes()
    step_latency, step_hits, step_calls = [], [], []
    for step in steps:
        start = clock
        hits = calls = 0
        if nonexpert_s_per_layer is not None:  # measured per decode token; prefill scaled by its tokens
            ne = nonexpert_s_per_layer * step.tokens
        else:
            ne = prof.device.expert_time(nonexpert_bytes_per_layer, 2.0 * nonexpert_bytes_per_layer, step.tokens) \
                if nonexpert_bytes_per_layer else 0.0
        for layer in range(layers):
            clock += ne
            view.now = clock
            view.cpu_assigned = 0.0
            cpu_work: list[int] = []
            dev_ready: list[tuple[float, int]] = []  # resident calls: (may start at, tokens)
            dev_copied: list[tuple[float, int]] = []  # copied calls: (copy lands at, tokens)
            layer_calls = step.calls[layer]
            layer_copies = 0
            for expert, n in layer_calls:
                key = (layer, expert)
                d = policy.decide(key, n, view)
                for old in d.evicted:
                    view.ready_at.pop(old, None)
                if d.transfer:
                    copies += 1
                    layer_copies += 1
                    done = view.enqueue(t_copy, key if d.admit else None)
                    staged = staged or not d.admit
                if d.where == "cpu":
                    view.cpu_assigned += t_cpu(n)
                    cpu_work.append(n)
                elif d.transfer:
                    dev_copied.append((done, n))
                else:
                    hits_l[layer] += 1
                    hits += 1
                    dev_ready.append((max(clock, view.ready_at.get(key, 0.0)), n))
            calls_l[layer] += len(layer_calls)
            calls += len(layer_calls)
            cpu_calls += len(cpu_work)
            if prof.device_is_host:  # one set of cores: copies, device and CPU calls in turn
                clock += layer_copies * t_copy + sum(t_cpu(n) for n in cpu_work) \
                    + sum(t_dev(n) for _, n in dev_ready + dev_copied)
                view.free_at = clock
                continue
            cpu_end = clock
            for n in cpu_work:
                cpu_end += _cpu_call_time(predictor, n, cpu_end, view.free_at)
            if cpu_work:
                cpu_end += act_roundtrip
            dev_end = clock
            if len(dev_ready) > 1:
                dev_ready.sort()
            for ready, n in dev_ready + dev_copied:
                dev_end = max(dev_end, ready) + t_dev(n)
            clock = max(cpu_end, dev_end)
        step_latency.append(clock - start)
        step_hits.append(hits)
        step_calls.append(calls)
        peak = max(peak, policy.resident_bytes())
    return Replay(np.array(hits_l, dtype=np.float64), np.array(calls_l, dtype=np.float64), cpu_calls, copies,
                  staged, peak, np.array(step_latency), np.array(step_hits), np.array(step_calls))


def summarize(name: str, replay: Replay, steps: Sequence[Step], budget_bytes: int, total_expert_bytes: int,
              expert_bytes: int, nonexpert_bytes: int, profile: HardwareProfile) -> SimResult:
    decode = np.array([not st.prefill for st in steps])
    prefill = ~decode
    lat = replay.step_latency[decode]
    calls = int(replay.calls_per_layer.sum())
    tokens = sum(st.tokens for st in steps)
    cum_hits = np.cumsum(replay.step_hits)[decode]
    cum_calls = np.maximum(np.cumsum(replay.step_calls)[decode], 1)
    layer_rate = replay.hits_per_layer / np.maximum(replay.calls_per_layer, 1)
    device_bytes = int(replay.peak_resident_bytes + (expert_bytes if replay.staged else 0) + nonexpert_bytes)
    return SimResult(
        policy=name,
        budget_bytes=budget_bytes,
        budget_frac=budget_bytes / total_expert_bytes,
        calls=calls,
        hit_rate=float(replay.hits_per_layer.sum() / max(calls, 1)),
        layer_hit_std=float(layer_rate.std()),
        cpu_share=replay.cpu_calls / max(calls, 1),
        bytes_moved_per_token=replay.copies * expert_bytes / max(tokens, 1),
        latency_mean_s=float(lat.mean()) if len(lat) else 0.0,
        latency_std_s=float(lat.std()) if len(lat) else 0.0,
        latency_p50_s=float(np.percentile(lat, 50)) if len(lat) else 0.0,
        latency_p99_s=float(np.percentile(lat, 99)) if len(lat) else 0.0,
        tokens_per_s=float(1.0 / lat.mean()) if len(lat) and lat.mean() > 0 else 0.0,
        ttft_mean_s=float(replay.step_latency[prefill].mean()) if prefill.any() else None,
        device_bytes=device_bytes,
        fits_device=device_bytes <= profile.device_memory.value,
        latency_s=lat,
        cum_hit_rate=cum_hits / cum_calls,
    )


def _context(stats: ProfileStats, budget: int, expert_bytes: int, predictor: CostPredictor, *,
             pin_share: float, path_share: float, ranking: list[Key] | None = None,
             future: list[Key] | None = None) -> PolicyContext:
    return PolicyContext(budget_bytes=int(budget), expert_bytes=expert_bytes, predictor=predictor, stats=stats,
                         ranking=ranking, future=future, pin_share=pin_share, path_share=path_share)


PIN_SHARES = (1.0, 0.75, 0.5, 0.25)
TIE_TOLERANCE = 1e-3  # relative: shares this close in replayed time count as tied


def tune_pin_share(profile_trace: Trace, predictor: CostPredictor, budgets: Sequence[int], expert_bytes: int, *,
                   nonexpert_bytes_per_layer: int = 0, prefill_tokens: int = 0, path_window: int = 2,
                   path_share: float = 0.0, candidates: Sequence[float] = PIN_SHARES) -> list[float]:
    """haq's pinned share for each budget, chosen on the profile part only.

    Whether the unpinned part should hold recently used experts (an LRU fed by background copies)
    or more static placement depends on the workload's temporal locality, which placement
    statistics alone do not settle; so each candidate is replayed: statistics from the first half
    of the profile's sequences, time measured on the second half. Ties (within TIE_TOLERANCE)
    go to the larger share; a budget that holds every expert pins them all.
    """
    if len(profile_trace.sequences()) >= 2:
        stats_part, score_part = split_by_sequence(profile_trace, 0.5)
    else:
        stats_part = score_part = profile_trace  # one sequence: score in-sample
    steps = replay_steps(score_part, prefill_tokens)
    stats = profile_statistics(stats_part, path_window)
    chosen = []
    for budget in budgets:
        best, best_time = candidates[0], float("inf")
        if budget >= stats.layers * stats.num_experts * expert_bytes:
            chosen.append(max(candidates))
            continue
        for share in candidates:
            ctx = _context(stats, budget, expert_bytes, predictor, pin_share=share, path_share=path_share)
            replay = run_policy(make_policy("haq", ctx), steps, predictor, stats.layers, nonexpert_bytes_per_layer)
            if replay.step_latency.sum() < best_time * (1 - TIE_TOLERANCE):
                best, best_time = share, float(replay.step_latency.sum())
        chosen.append(best)
    return chosen


def policy_context(profile_trace: Trace, budget_bytes: int, expert_bytes: int, predictor: CostPredictor, *,
                   pin_share: float | None = None, path_share: float = 0.0, path_window: int = 2,
                   ranking: list[Key] | None = None, nonexpert_bytes_per_layer: int = 0,
                   prefill_tokens: int = 0) -> PolicyContext:
    """What `make_policy` needs, from a profile trace; for executors other than `simulate` (the engine).

    pin_share None: haq's share is tuned on the profile trace (`tune_pin_share`, a few replays).
    """
    if pin_share is None:
        pin_share = tune_pin_share(profile_trace, predictor, [budget_bytes], expert_bytes, path_window=path_window,
                                   path_share=path_share, nonexpert_bytes_per_layer=nonexpert_bytes_per_layer,
                                   prefill_tokens=prefill_tokens)[0]
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
    profile_trace: Trace | None = None,
    profile_frac: float = 0.5,
    path_window: int = 2,
    pin_share: float | None = None,
    path_share: float = 0.0,
    ranking: list[Key] | None = None,
) -> list[SimResult]:
    """One SimResult per (budget, policy), budgets in the outer loop.

    Without `profile_trace` the trace is split by sequence (`profile_frac` of the sequences build the
    placement statistics, the rest is replayed). `ranking` is what policy fiddler-list places
    (e.g. `load_fiddler_ranking()` for Mixtral-8x7B). `nonexpert_s_per_layer`, when measured
    (`Engine.measure_overhead_s_per_layer`: attention, router and dispatch), replaces the bytes-derived time of
    the non-expert part of a layer. haq's `pin_share` is tuned per budget on the
    profile part when None (`tune_pin_share`); `path_share` is its stage-1 share.
    """
    if profile_trace is None:
        profile_trace, trace = split_by_sequence(trace, profile_frac)
    if (profile_trace.meta.layers, profile_trace.meta.num_experts) != (trace.meta.layers, trace.meta.num_experts):
        raise HaqError("profile trace and replayed trace come from different model shapes")
    L, E = trace.meta.layers, trace.meta.num_experts
    predictor = CostPredictor(profile, expert_bytes, flops_per_token)
    steps = replay_steps(trace, prefill_tokens)
    future = [(layer, e) for st in steps for layer in range(L) for e, _ in st.calls[layer]]
    stats = profile_statistics(profile_trace, path_window)
    budgets = [int(budget_bytes)] if np.ndim(budget_bytes) == 0 else [int(b) for b in budget_bytes]
    if min(budgets) < 0:
        raise HaqError(f"budgets must be >= 0 bytes, got {min(budgets)}")
    if pin_share is not None or "haq" not in policies:
        shares = [PIN_SHARES[0] if pin_share is None else pin_share] * len(budgets)
    else:
        shares = tune_pin_share(profile_trace, predictor, budgets, expert_bytes, prefill_tokens=prefill_tokens,
                                nonexpert_bytes_per_layer=nonexpert_bytes_per_layer, path_window=path_window,
                                path_share=path_share)
    rows = []
    for budget, share in zip(budgets, shares):
        ctx = _context(stats, budget, expert_bytes, predictor, pin_share=share, path_share=path_share,
                       ranking=ranking, future=future)
        for name in policies:
            replay = run_policy(make_policy(name, ctx), steps, predictor, L, nonexpert_bytes_per_layer,
                                nonexpert_s_per_layer)
            row = summarize(name, replay, steps, budget, L * E * expert_bytes, expert_bytes,
                            L * nonexpert_bytes_per_layer, profile)
            if name == "haq":
                row.detail = f"pin_share={ctx.pin_share}, path_share={ctx.path_share}"
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
            f"{r.bytes_moved_per_token / 1e6:.0f} | {r.latency_mean_s * 1e3:.1f} | {r.latency_std_s * 1e3:.1f} | "
            f"{r.latency_p50_s * 1e3:.1f} | {r.latency_p99_s * 1e3:.1f} | {r.tokens_per_s:.2f} | "
            f"{r.device_bytes / 2**30:.1f} | {'yes' if r.fits_device else 'no'} |")
    return "\n".join(lines)
