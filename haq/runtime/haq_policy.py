"""haq's policy: two-stage placement pinned, an LRU for the rest fed by copies that repay
themselves, the cost predictor per call, and prefetch along predicted expert paths."""
from __future__ import annotations

import numpy as np

from haq.runtime.cache import ExpertCache, Key
from haq.runtime.placement import two_stage_placement
from haq.runtime.policies import ExecView, PolicyContext, Prefetch, register
from haq.runtime.predictor import Decision


@register("haq")
class Haq:
    """Two-stage placement pinned, LRU for the rest, the cost predictor per call.

    Admission weighs what the candidate would serve against what the LRU victim it evicts would
    serve, over the H tokens an admitted entry is expected to stay:
      value(key, age) = H * p[key] + X[age + H] - X[age]
      reuse = value(candidate, 0) - value(victim, its age)
    p: per-token selection rate in the profile; X: the layer's locality-excess curve (extra uses
    within k tokens of a use); age: tokens since the key's last use; H: LRU slots over recent
    admissions per token. A free slot has value 0. A copy made for the call is kept when reuse > 0;
    a background copy when reuse repays its cost (`CostPredictor.break_even_reuse`). Without
    temporal locality this converges to the highest-rate experts (a static placement); with it, to
    the recently used ones, without thrashing when copies come faster than they are reused.

    Prefetch (`prefetch`): for the next layer, most probable experts first, a non-resident expert
    is copied in the background when the copy can land by the time its call could still use it
    (link backlog + t_copy <= lead) and its value repays the CPU time its DMA costs:
        q (1 + X[H]) + H p[key] - value(victim, its age) > break_even_reuse,
    q the predicted probability of the call (once called, the expert is just used: X[H] more).
    A wrong guess costs link time, CPU bandwidth and an LRU slot, never a wrong result.

    Prefill, pipelined (`prefill_ahead`): while layer l runs, the link's idle time before layer l+1
    (lead minus its backlog) copies layer l+1's absent experts, the most tokens expected first
    (batch x profile rate, >= 1), into staging buffers, not the cache. A copy that has landed beats
    any CPU run of its call, so the schedule is only which experts; on a saturated link it starts
    nothing, since moving copies earlier there only reorders them. A call that finds its copy ahead
    decides as if resident and landing (the device, or the CPU when the copy is late), and is
    admitted from its staging buffer when a copy made for the call would be.
    """

    name = "haq"

    def __init__(self, ctx: PolicyContext) -> None:
        self.predictor = ctx.predictor
        self.expert_bytes = ctx.expert_bytes
        pinned_slots = int(round(ctx.pin_share * ctx.slots))
        stats = ctx.stats
        pinned = two_stage_placement(stats.freq, stats.paths, pinned_slots, ctx.path_share)
        self.cache = ExpertCache(ctx.budget_bytes, {k: ctx.expert_bytes for k in pinned})
        self.resident = np.zeros(stats.freq.shape, dtype=bool)  # [L, E] key in self.cache, as an array
        for layer, expert in pinned:
            self.resident[layer, expert] = True
        self.unpinned = [np.flatnonzero(~row) for row in self.resident]  # prefetch candidates per layer
        self.lru_slots = ctx.slots - len(pinned)
        tokens = max(stats.tokens, 1)
        self.p_rows = stats.freq / tokens  # [L, E] per-token selection rate
        self.p = self.p_rows.tolist()  # the same as plain floats: read on every miss
        self.p_max_unpinned = [float(row[ids].max()) if len(ids) else 0.0
                               for row, ids in zip(self.p_rows, self.unpinned)]
        self.X = stats.locality.T.tolist()  # [L][lags + 1]
        self.X_top = stats.locality.shape[0] - 1
        self.calls_per_token = float(stats.freq.sum()) / tokens
        self.calls_per_token_floor = max(self.calls_per_token, 1.0)
        self.ema = 1.0 / (20 * self.calls_per_token_floor)  # moving average over ~20 tokens of calls
        self.min_admits_per_token = 1.0 / max(self.lru_slots, 1)
        self.admits_per_call = 0.0
        self.calls = 0
        self.last_use: dict[Key, int] = {}  # key -> call counter at its last use
        self.prefetching = ctx.prefetch and self.lru_slots > 0 and not ctx.predictor.shared
        self.pipelining = ctx.pipeline and not ctx.predictor.shared  # prefill copies a layer ahead

    def _excess(self, layer: int, age: float, span: float) -> float:
        X, top = self.X[layer], self.X_top
        return X[min(int(age + span), top)] - X[min(int(age), top)]

    def _horizon(self) -> float:
        per_token = self.admits_per_call * self.calls_per_token
        return self.lru_slots / max(per_token, self.min_admits_per_token)

    def _victim_value(self, horizon: float) -> float:
        v = self.cache.next_victim(self.expert_bytes)
        if v is None:
            return 0.0
        age = (self.calls - self.last_use.get(v, 0)) / self.calls_per_token_floor
        return horizon * self.p[v[0]][v[1]] + self._excess(v[0], age, horizon)

    def expected_reuse(self, key: Key) -> float:
        """Later uses of `key` if admitted now, just used, net of what its victim would serve."""
        horizon = self._horizon()
        gain = horizon * self.p[key[0]][key[1]] + self._excess(key[0], 0.0, horizon)
        return gain - self._victim_value(horizon)

    def prefetch_gain(self, layer: int, probs: np.ndarray, horizon: float) -> np.ndarray:
        """[E] uses of each expert of `layer` if copied now, called with probability `probs` (then just
        used, with the locality that brings); its victim's value is not subtracted."""
        return probs * (1.0 + self._excess(layer, 0.0, horizon)) + horizon * self.p_rows[layer]

    def decide(self, key: Key, n: int, view: ExecView) -> Decision:
        p = self.predictor
        self.calls += 1
        if key in self.cache:
            d = p.decide(n, True, ready_in_s=view.ready_in_s(key), cpu_backlog_s=view.cpu_backlog_s())
            if d.where == "device":
                self.cache.lookup(key)
                self.last_use[key] = self.calls
            self.admits_per_call += self.ema * (False - self.admits_per_call)  # _count(False), inline: the hot path
            return d
        if view.copied_ahead(key):  # only absent experts are copied ahead
            d = p.decide(n, True, ready_in_s=view.ready_in_s(key), cpu_backlog_s=view.cpu_backlog_s())
            d.ahead = d.where == "device"
            if d.ahead and self.lru_slots and self.expected_reuse(key) > 0.0:  # kept as a copy for the call is
                evicted = self._keep(key)
                if evicted is not None:
                    d.admit, d.evicted = True, evicted
            self._count(d.admit)
            return d
        d = p.decide(n, False, link_backlog_s=view.link_backlog_s(), cpu_backlog_s=view.cpu_backlog_s(),
                     expected_reuse=self.expected_reuse(key) if self.lru_slots else 0.0)
        if d.admit:
            evicted = self._keep(key)
            if evicted is not None:
                d.evicted = evicted
            else:
                d.admit, d.transfer = False, d.where == "device"
        self._count(d.admit)
        return d

    def prefetch(self, layer: int, probs: np.ndarray, view: ExecView, lead_s: float) -> list[Prefetch]:
        if not self.prefetching:
            return []
        p = self.predictor
        in_time = int((lead_s - view.link_backlog_s()) // p.t_transfer())  # copies that land before the calls
        if in_time <= 0:
            return []
        horizon = self._horizon()
        probs = np.asarray(probs, dtype=np.float64)
        victim = self._victim_value(horizon)
        # the common case, nothing repays its copy, first on an upper bound of the unpinned experts'
        # gain (pinned ones are always resident)...
        unpinned = self.unpinned[layer]
        if not len(unpinned):
            return []
        bound = float(probs[unpinned].max()) * (1.0 + self._excess(layer, 0.0, horizon)) \
            + horizon * self.p_max_unpinned[layer]
        if bound - victim <= p.break_even_reuse:
            return []
        gain = self.prefetch_gain(layer, probs, horizon)
        if not ((gain - victim > p.break_even_reuse) & ~self.resident[layer]).any():
            return []  # ... then exactly, before sorting
        order = np.argsort(-probs, kind="stable")
        gain = gain[order]  # most probable first
        out: list[Prefetch] = []
        issued: set[Key] = set()
        start = 0
        while len(out) < in_time:
            # the next expert in order worth its copy against the current victim and not resident
            worth = np.flatnonzero((gain[start:] - victim > p.break_even_reuse) & ~self.resident[layer][order[start:]])
            if not len(worth):
                break
            at = start + int(worth[0])
            key, start = (layer, int(order[at])), at + 1
            if issued.intersection(self.cache.victims(self.expert_bytes)):
                break  # the LRU part is full of this layer's prefetches: a likelier one would go
            evicted = self._keep(key)
            if evicted is None:
                break
            self.admits_per_call += self.ema  # an admission between calls: the LRU turns over faster
            issued.add(key)
            out.append(Prefetch(key, evicted))
            victim = self._victim_value(horizon)
        return out

    def prefill_ahead(self, layer: int, tokens: int, view: ExecView, lead_s: float) -> list[Key]:
        if not self.pipelining or tokens < 2:
            return []
        p = self.predictor
        room = int((lead_s - view.link_backlog_s()) // p.t_transfer())  # copies the idle link lands in time
        if room <= 0:
            return []
        expected = tokens * self.p_rows[layer]
        out: list[Key] = []
        for e in np.argsort(-expected, kind="stable"):  # the busiest first: likeliest called, and on the link
            if len(out) == room or expected[e] < 1.0:
                break
            if not self.resident[layer, e]:
                out.append((layer, int(e)))
        return out

    def _keep(self, key: Key) -> tuple[Key, ...] | None:
        """Admit `key` to the cache: the keys it evicted, or None when the cache refuses it (then
        nothing is evicted). Ages count from admission; evicted keys have none."""
        evicted = self.cache.admit(key, self.expert_bytes)
        if key not in self.cache:
            return None
        self.last_use[key] = self.calls
        self.resident[key] = True
        for old in evicted:
            self.last_use.pop(old, None)
            self.resident[old] = False
        return tuple(evicted)

    def _count(self, admitted: bool) -> None:
        self.admits_per_call += self.ema * (admitted - self.admits_per_call)

    def preload(self) -> list[Key]:
        return sorted(self.cache.pinned)  # the LRU part starts empty and fills by admission

    def resident_bytes(self) -> int:
        return self.cache.used_bytes
