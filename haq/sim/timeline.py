"""Trace-driven simulator: replay routing through a policy on a modelled machine.

The policies are the runtime's objects (`haq.runtime.policies`); the machine is a HardwareProfile.
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

from haq.runtime.cache import Key
from haq.runtime.hardware import HardwareProfile
from haq.runtime.predictor import CostPredictor
from haq.runtime.trace import Trace
from haq.runtime.policies import Policy


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
