"""Trace-driven simulator: replay routing through a policy on a modelled machine.

The policies are the runtime's objects (`haq.runtime.policies`); the machine is a HardwareProfile.
Nothing here runs a model: a trace says which experts each token calls, the profile says how long
each call and copy takes, and the timeline below adds them up.

Replay. The trace is split by sequence: the first part is the profile (placement statistics), the
rest is replayed, sequence by sequence. With `prefill_tokens` = P > 0 the first P tokens of each
sequence form one batch (each expert called once with the number of its tokens); the remaining
tokens are decoded one at a time (batch 1), or, with `decode_batch` = B, B sequences decode
together: a step holds one token of each, and each expert is called once with its tokens.

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
  7. `Policy.preload()` experts are on the device before the clock starts;
  8. prefetch (one-token decode steps, with a `Lookahead`): once layer l's calls are decided, the policy
     may queue copies for layer l+d (`Policy.prefetch`) behind the layer's own copies, given the
     prediction for l+d and, as the lead time, d times the previous layer's duration. They take
     link time and slow CPU streaming like any copy.
  9. prefill pipelining: once layer l's calls are decided, the policy may start copies of layer
     l+1's experts (`Policy.prefill_ahead`), behind the layer's own copies, into staging buffers
     freed when layer l+1 has run; a call there served from one waits for its copy (not a hit).
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
from haq.runtime.predictor import CostPredictor
from haq.runtime.trace import Trace
from haq.runtime.policies import Policy
from haq.sim import native_replay
from haq.sim.lookahead import PREDICT_BLOCK, Lookahead


@dataclass(frozen=True)
class Step:
    """One forward pass: a decode token (tokens = 1) or a prefill batch."""

    tokens: int
    prefill: bool
    calls: list[list[tuple[int, int]]]  # per layer: (expert, tokens routed to it)
    pregate: list[list[int]] | None = None  # decode: per layer, its recorded pre-gate prediction
    experts: np.ndarray | None = None  # one-token steps: its [L, K] expert ids (-1 = none), for prediction


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
    tokens_per_s: float  # decode: tokens of every decode step over their time (steps hold decode_batch tokens)
    ttft_mean_s: float | None  # prefill latency per sequence, when prefill is simulated
    prefill_tokens_per_s: float | None  # prompt tokens over prefill time
    device_bytes: int  # peak expert bytes resident + staging buffers (one if copies are not kept, and
    # the most prefill copies started a layer ahead) + non-expert
    fits_device: bool
    prefetches_per_token: float  # prefetch copies per replayed token
    prefetch_used: float  # share of prefetched experts called (on the device) before their eviction
    ahead_per_prefill_token: float  # prefill copies started a layer ahead, per prompt token
    latency_s: np.ndarray = field(repr=False)  # [decode tokens]
    cum_hit_rate: np.ndarray = field(repr=False)  # [decode tokens] hit rate of all calls so far
    layer_hit_rate: np.ndarray = field(repr=False)  # [layers] device hit rate of each layer's calls
    detail: str = ""  # policy settings worth showing (haq: its tuned pin share)


class SimView:
    """The modelled copy queue (FIFO) and CPU work of the current layer; the simulator's ExecView."""

    def __init__(self) -> None:
        self.now = 0.0
        self.free_at = 0.0  # when the link has sent everything queued
        self.cpu_assigned = 0.0  # predicted CPU seconds assigned in the current layer
        self.ready_at: dict[Key, float] = {}
        self.ahead: set[Key] = set()  # this layer's `prefill_ahead` copies, in staging buffers

    def link_backlog_s(self) -> float:
        return max(0.0, self.free_at - self.now)

    def cpu_backlog_s(self) -> float:
        return self.cpu_assigned

    def ready_in_s(self, key: Key) -> float:
        return max(0.0, self.ready_at.get(key, 0.0) - self.now)

    def copied_ahead(self, key: Key) -> bool:
        return key in self.ahead

    def enqueue(self, seconds: float, key: Key | None) -> float:
        self.free_at = max(self.now, self.free_at) + seconds
        if key is not None:
            self.ready_at[key] = self.free_at
        return self.free_at


def _layer_calls(rows: np.ndarray) -> list[list[tuple[int, int]]]:
    """rows [n, L, K] of tokens run together -> per layer (expert, tokens), largest first (greedy list
    scheduling over CPU and link)."""
    calls = []
    for layer in range(rows.shape[1]):
        ids, counts = np.unique(rows[:, layer], return_counts=True)
        order = np.argsort(-counts, kind="stable")
        calls.append([(int(ids[j]), int(counts[j])) for j in order if ids[j] >= 0])
    return calls


def replay_steps(trace: Trace, prefill_tokens: int = 0, decode_batch: int = 1) -> list[Step]:
    """The forward passes of a replay, in order (see the module docstring). With `decode_batch`
    B > 1, sequences go in groups of B: each is prefilled alone, then the group decodes together,
    one step per position with a token of every sequence that still has one."""
    if decode_batch < 1:
        raise HaqError(f"decode_batch must be >= 1, got {decode_batch}")
    steps: list[Step] = []
    bounds = np.flatnonzero(np.diff(trace.seq_id)) + 1
    seqs = np.split(trace.experts, bounds)  # [S, L, K] each
    pregates = np.split(trace.pregate, bounds) if trace.pregate is not None else [None] * len(seqs)
    for g in range(0, len(seqs), decode_batch):
        group = seqs[g:g + decode_batch]
        heads = [min(prefill_tokens, len(seq)) for seq in group]
        for seq, head in zip(group, heads):
            if head:
                steps.append(Step(tokens=head, prefill=True, calls=_layer_calls(seq[:head]),
                                  experts=seq[0] if head == 1 else None))
        if decode_batch == 1:
            seq, head, pre = group[0], heads[0], pregates[g]
            guesses = pre[head:].tolist() if pre is not None else [None] * (len(seq) - head)
            for ids, row, guess in zip(seq[head:], seq[head:].tolist(), guesses):
                steps.append(Step(tokens=1, prefill=False, calls=[[(e, 1) for e in r if e >= 0] for r in row],
                                  pregate=None if guess is None else [[e for e in r if e >= 0] for r in guess],
                                  experts=ids))
            continue
        for t in range(max(len(seq) - head for seq, head in zip(group, heads))):
            rows = np.stack([seq[head + t] for seq, head in zip(group, heads) if head + t < len(seq)])
            steps.append(Step(tokens=len(rows), prefill=False, calls=_layer_calls(rows)))
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
    prefetches: int = 0
    prefetch_hits: int = 0  # prefetched experts served on the device before being evicted
    ahead_copies: int = 0  # prefill copies started a layer ahead (`Policy.prefill_ahead`)
    ahead_peak: int = 0  # the most staging buffers those held at once (a layer's still in use + the next's)


def run_policy(policy: Policy, steps: Sequence[Step], predictor: CostPredictor, layers: int,
               nonexpert_bytes_per_layer: int = 0, nonexpert_s_per_layer: float | None = None,
               lookahead: Lookahead | None = None) -> Replay:
    """Replay `steps` through `policy` on the timeline of the module docstring; `lookahead`
    predicts decode steps' experts for `Policy.prefetch` (None: no prefetch)."""
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
    prefetched: set[Key] = set()  # prefetched and not yet called or evicted
    prefetches = prefetch_hits = ahead_copies = ahead_peak = 0
    ahead_next: set[Key] = set()  # copies started for the next layer of a prefill step
    lead = t_cpu(1)  # the previous layer's duration: lead * d, when layer l+d's calls are expected

    def evict(keys: Sequence[Key]) -> None:
        for old in keys:
            view.ready_at.pop(old, None)
            prefetched.discard(old)

    def nonexpert_s(tokens: int) -> float:
        if nonexpert_s_per_layer is not None:  # measured per decode token; prefill scaled by its tokens
            return nonexpert_s_per_layer * tokens
        return prof.device.expert_time(nonexpert_bytes_per_layer, 2.0 * nonexpert_bytes_per_layer, tokens) \
            if nonexpert_bytes_per_layer else 0.0

    if lookahead is None and native_replay.runs(policy):  # the same timeline in C, bit for bit
        memo = {n: nonexpert_s(n) for n in {st.tokens for st in steps}}
        ne = np.fromiter((memo[st.tokens] for st in steps), dtype=np.float64, count=len(steps))
        return Replay(**native_replay.replay(policy, steps, predictor, layers, ne))
    predicted: dict[int, np.ndarray] = {}  # step index -> its lookahead rows, a block at a time
    for index, step in enumerate(steps):
        start = clock
        hits = calls = 0
        ne = nonexpert_s(step.tokens)
        if lookahead is not None and index % PREDICT_BLOCK == 0:
            block = [i for i in range(index, min(index + PREDICT_BLOCK, len(steps))) if steps[i].tokens == 1]
            predicted = dict(zip(block, lookahead.probs([steps[i] for i in block]))) if block else {}
        guess = predicted.get(index)
        for layer in range(layers):
            layer_start = clock
            clock += ne
            view.now = clock
            view.cpu_assigned = 0.0
            cpu_work: list[int] = []
            dev_ready: list[tuple[float, int]] = []  # resident calls: (may start at, tokens)
            dev_copied: list[tuple[float, int]] = []  # copied calls: (copy lands at, tokens)
            layer_calls = step.calls[layer]
            layer_copies = 0
            view.ahead, ahead_next = ahead_next, set()
            for expert, n in layer_calls:
                key = (layer, expert)
                d = policy.decide(key, n, view)
                if d.evicted:
                    evict(d.evicted)
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
                elif d.ahead:
                    dev_copied.append((view.ready_at[key], n))
                    if d.admit:  # out of the staging buffers into the cache
                        view.ahead.discard(key)
                else:
                    hits_l[layer] += 1
                    hits += 1
                    dev_ready.append((max(clock, view.ready_at.get(key, 0.0)), n))
                    if key in prefetched:
                        prefetch_hits += 1
                        prefetched.discard(key)
            if guess is not None and layer < len(guess):
                target = layer + lookahead.distance
                for pf in policy.prefetch(target, guess[layer], view, lead * lookahead.distance):
                    evict(pf.evicted)
                    view.enqueue(t_copy, pf.key)
                    prefetched.add(pf.key)
                    copies += 1
                    layer_copies += 1
                    prefetches += 1
            for key in view.ahead:  # their buffers are freed once the layer has run
                view.ready_at.pop(key, None)
            if step.prefill and layer + 1 < layers:
                for key in policy.prefill_ahead(layer + 1, step.tokens, view, lead):
                    view.enqueue(t_copy, key)
                    ahead_next.add(key)
                    copies += 1
                    layer_copies += 1
                ahead_copies += len(ahead_next)
                ahead_peak = max(ahead_peak, len(view.ahead) + len(ahead_next))  # this layer's still held
            calls_l[layer] += len(layer_calls)
            calls += len(layer_calls)
            cpu_calls += len(cpu_work)
            if prof.device_is_host:  # one set of cores: copies, device and CPU calls in turn
                clock += layer_copies * t_copy + sum(t_cpu(n) for n in cpu_work) \
                    + sum(t_dev(n) for _, n in dev_ready + dev_copied)
                view.free_at = clock
                lead = clock - layer_start
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
            lead = clock - layer_start
        step_latency.append(clock - start)
        step_hits.append(hits)
        step_calls.append(calls)
        peak = max(peak, policy.resident_bytes())
    return Replay(np.array(hits_l, dtype=np.float64), np.array(calls_l, dtype=np.float64), cpu_calls, copies,
                  staged, peak, np.array(step_latency), np.array(step_hits), np.array(step_calls),
                  prefetches, prefetch_hits, ahead_copies, ahead_peak)


def summarize(name: str, replay: Replay, steps: Sequence[Step], budget_bytes: int, total_expert_bytes: int,
              expert_bytes: int, nonexpert_bytes: int, profile: HardwareProfile) -> SimResult:
    decode = np.array([not st.prefill for st in steps])
    prefill = ~decode
    lat = replay.step_latency[decode]
    decode_tokens = np.array([st.tokens for st in steps if not st.prefill], dtype=np.float64)
    calls = int(replay.calls_per_layer.sum())
    tokens = sum(st.tokens for st in steps)
    prompt_tokens = sum(st.tokens for st in steps if st.prefill)
    cum_hits = np.cumsum(replay.step_hits)[decode]
    cum_calls = np.maximum(np.cumsum(replay.step_calls)[decode], 1)
    layer_rate = replay.hits_per_layer / np.maximum(replay.calls_per_layer, 1)
    # staging buffers: copies made for a call and not kept, copies started ahead; peaks of different
    # moments added, so an upper bound
    staging = int(replay.staged) + replay.ahead_peak
    device_bytes = int(replay.peak_resident_bytes + staging * expert_bytes + nonexpert_bytes)
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
        tokens_per_s=float(decode_tokens.sum() / lat.sum()) if len(lat) and lat.sum() > 0 else 0.0,
        ttft_mean_s=float(replay.step_latency[prefill].mean()) if prefill.any() else None,
        prefill_tokens_per_s=float(prompt_tokens / replay.step_latency[prefill].sum())
        if prefill.any() and replay.step_latency[prefill].sum() > 0 else None,
        device_bytes=device_bytes,
        fits_device=device_bytes <= profile.device_memory.value,
        prefetches_per_token=replay.prefetches / max(tokens, 1),
        prefetch_used=replay.prefetch_hits / max(replay.prefetches, 1),
        ahead_per_prefill_token=replay.ahead_copies / max(prompt_tokens, 1),
        latency_s=lat,
        cum_hit_rate=cum_hits / cum_calls,
        layer_hit_rate=layer_rate,
    )
