"""Expert prediction a few layers ahead, from profile paths, and how well a prediction source does.

Prefetching copies an expert over the link before its layer asks for it, so it has to guess which
experts a later MoE layer will pick, `distance` layers ahead: far enough that the copy lands in
time (a Mixtral int8 expert takes ~7 ms over PCIe 4.0, a decode layer ~4 ms on a desktop CPU,
hence PREFETCH_DISTANCE = 2). Two sources feed the same policy (`Policy.prefetch`):
  - path statistics (here), from the profile part of a trace: the probability that expert e is
    in layer l+d's top-k given the top-k sets the token chose at layers l and l-1. Usable by the
    simulator on any trace;
  - pre-gating (the engine, and `haq trace`, which records it): layer l+d's router applied to
    layer l's MoE input, since the residual stream changes little from one layer to the next.

The path estimate: the empirical distribution of layer l+d's set given the whole set at layer l,
shrunk toward the mean of the pairwise conditionals P(e at l+d | x at l), x in that set, and
P(e at l+d | y at l-1), y in the set at l-1, with `prior_weight` pseudo-observations. Frequent
sets get their own statistics; rare or unseen ones the pairwise average (for 64 experts top-6,
nearly every set is rare).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from haq.errors import HaqError
from haq.runtime.trace import Trace

PRIOR_WEIGHT = 8.0  # pseudo-observations of the pairwise average behind a set's own counts
PREFETCH_DISTANCE = 2  # layers between the prediction and the layer it is for


def _inclusion(experts: np.ndarray, E: int) -> np.ndarray:
    """[T, K] expert ids (-1 = none) -> [T, E] 0/1."""
    out = np.zeros((len(experts), E + 1))
    np.put_along_axis(out, np.where(experts >= 0, experts, E).astype(np.int64), 1.0, axis=1)
    return out[:, :E]


@dataclass(frozen=True)
class PathPredictor:
    """P(expert e in layer l+d's top-k | the token's sets at layers l and l-1), from a profile.

    pair1 [L-d, E, E]: P(e at l+d | x at l), rows x; pair2 [L-d-1, E, E]: P(e at l+d | y at l-1);
    marginal [L, E]: P(e at l); sets[l]: {sorted set at l: (count, summed inclusion at l+d [E])}.
    """

    distance: int
    pair1: np.ndarray
    pair2: np.ndarray
    marginal: np.ndarray
    sets: tuple[dict[tuple[int, ...], tuple[float, np.ndarray]], ...]
    prior_weight: float = PRIOR_WEIGHT

    @classmethod
    def from_trace(cls, trace: Trace, distance: int = PREFETCH_DISTANCE,
                   prior_weight: float = PRIOR_WEIGHT) -> PathPredictor:
        L, E = trace.meta.layers, trace.meta.num_experts
        if trace.num_tokens == 0:
            raise HaqError("a path predictor needs a profile trace with at least one token")
        if not 1 <= distance < L:
            raise HaqError(f"prediction distance must be in [1, {L - 1}] layers for {L} MoE layers, got {distance}")
        d = distance
        inc = [_inclusion(trace.experts[:, layer], E) for layer in range(L)]  # L x [T, E]
        marginal = np.stack([x.mean(axis=0) for x in inc])

        def pairwise(a: np.ndarray, b: np.ndarray, prior: np.ndarray) -> np.ndarray:
            counts = a.T @ b  # [E, E]: tokens with x at the first layer and e at the second
            return (counts + prior[None, :]) / (a.sum(axis=0)[:, None] + 1.0)  # one pseudo-token of the marginal

        pair1 = np.stack([pairwise(inc[i], inc[i + d], marginal[i + d]) for i in range(L - d)])
        pair2 = np.stack([pairwise(inc[i], inc[i + d + 1], marginal[i + d + 1]) for i in range(L - d - 1)]) \
            if L > d + 1 else np.zeros((0, E, E))
        sets = []
        for layer in range(L - d):
            table: dict[tuple[int, ...], tuple[float, np.ndarray]] = {}
            keys = np.sort(trace.experts[:, layer], axis=1)
            uniq, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
            summed = np.zeros((len(uniq), E))
            np.add.at(summed, inverse.reshape(-1), inc[layer + d])
            for row, n, s in zip(uniq, counts, summed):
                table[tuple(int(e) for e in row if e >= 0)] = (float(n), s)
            sets.append(table)
        return cls(d, pair1, pair2, marginal, tuple(sets), prior_weight)

    @property
    def layers(self) -> int:
        return int(self.marginal.shape[0])

    def predict(self, layer: int, chosen: Sequence[int], previous: Sequence[int] = ()) -> np.ndarray:
        """[E] probability of each expert in the top-k of `layer` + distance, given the experts
        `chosen` at `layer` and `previous` at `layer` - 1 (empty at the first layer). One token and
        layer at a time: the readable form of `predict_paths`, which the tests hold it equal to."""
        if not 0 <= layer < self.layers - self.distance:
            raise HaqError(f"a prediction {self.distance} layer(s) ahead needs a layer in "
                           f"[0, {self.layers - self.distance - 1}], got {layer}")
        rows = [self.pair1[layer][list(chosen)]] if len(chosen) else []
        if len(previous) and layer >= 1:
            rows.append(self.pair2[layer - 1][list(previous)])
        prior = np.concatenate(rows).mean(axis=0) if rows else self.marginal[layer + self.distance]
        count, summed = self.sets[layer].get(tuple(sorted(int(e) for e in chosen)), (0.0, 0.0))
        return (summed + self.prior_weight * prior) / (count + self.prior_weight)

    def predict_paths(self, experts: np.ndarray) -> np.ndarray:
        """[T, L - d, E]: [t, l] is `predict(l, <experts[t, l]>, <experts[t, l - 1]>)` for tokens'
        expert ids `experts` [T, L, K] (-1 = none), bit for bit (the same rows summed in the same
        order), in a few array operations instead of a small call per token and layer (the replay
        predicts every decode step)."""
        L, d, E = self.layers, self.distance, self.marginal.shape[1]
        n = L - d
        ids = np.where(experts[:, :n] >= 0, experts[:, :n], E)  # E: a zero row (x + 0.0 == x)
        previous = np.concatenate([np.full_like(ids[:, :1], E), ids[:, :-1]], axis=1)
        first, second = self._padded_pairs
        layer = np.arange(n)[None, :, None]
        total = first[layer, ids].sum(axis=2)  # the chosen rows in order, then the previous ones
        for k in range(previous.shape[2]):
            total += second[np.arange(n), previous[:, :, k]]
        used = (ids < E).sum(axis=2) + (previous < E).sum(axis=2)
        with np.errstate(invalid="ignore", divide="ignore"):
            prior = np.where(used[..., None] > 0, total / used[..., None], self.marginal[d:])
        count, summed = np.zeros(used.shape), np.zeros(prior.shape)
        for t, path in enumerate(np.sort(experts[:, :n], axis=2).tolist()):
            for i, row in enumerate(path):
                hit = self.sets[i].get(tuple(row[row.count(-1):]))
                if hit is not None:
                    count[t, i], summed[t, i] = hit
        return (summed + self.prior_weight * prior) / (count + self.prior_weight)[..., None]

    @cached_property
    def _padded_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """pair1 and pair2 aligned on the predicting layer (pair2's row 0: layer 0 has no layer -1),
        each with a zero row E for padding."""
        n, E = self.pair1.shape[0], self.pair1.shape[1]
        first = np.zeros((n, E + 1, E))
        first[:, :E] = self.pair1
        second = np.zeros((n, E + 1, E))
        second[1:, :E] = self.pair2[:n - 1]
        return first, second


def pregate_distance(trace: Trace) -> int:
    """How many layers ahead the trace's pre-gate predictions were made (`haq trace` records it)."""
    if trace.pregate is None:
        raise HaqError(f"trace of {trace.meta.model} has no pre-gate predictions: record it with `haq trace`")
    d = trace.meta.extra.get("pregate_distance")
    if not isinstance(d, int) or isinstance(d, bool) or not 1 <= d < trace.meta.layers:
        raise HaqError(f"trace of {trace.meta.model} has pre-gate predictions but meta pregate_distance {d!r} "
                       f"is not a layer count in [1, {trace.meta.layers - 1}]")
    return d


def guessed(actual: np.ndarray, guesses: np.ndarray) -> np.ndarray:
    """actual [..., K] expert ids (-1 = none), guesses [..., G] -> [..., K]: called and guessed."""
    return (actual[..., :, None] == guesses[..., None, :]).any(axis=-1) & (actual >= 0)


def pregate_accuracy(trace: Trace) -> np.ndarray:
    """[L] per layer, the share of its chosen experts that the recorded pre-gate (the layer's router
    on the MoE input `pregate_distance` layers earlier) had predicted; 0 for the first layers,
    which nothing precedes by that much (their pre-gate is -1, never a called expert)."""
    pregate_distance(trace)
    actual = trace.experts
    return guessed(actual, trace.pregate).sum(axis=(0, 2)) / np.maximum((actual >= 0).sum(axis=(0, 2)), 1)


def pregate_rates(accuracy: float, num_experts: int, top_k: int) -> tuple[float, float]:
    """(P(called | in the pre-gate's top-k), P(called | not in it)) for one token: the layer's measured
    `accuracy`, and the rest of its top_k calls spread evenly over the other experts."""
    return accuracy, top_k * (1.0 - accuracy) / max(num_experts - top_k, 1)


def pregate_probabilities(predicted: Sequence[int], accuracy: float, num_experts: int, top_k: int) -> np.ndarray:
    """[E] calibrated probabilities from a pre-gate's top-k (`pregate_rates`)."""
    hit, miss = pregate_rates(accuracy, num_experts, top_k)
    out = np.full(num_experts, miss)
    out[list(predicted)] = hit
    return out


def prediction_accuracy(predictions: np.ndarray, actual: np.ndarray, top_k: int) -> float:
    """Share of the experts actually chosen that were among the `top_k` most probable predicted.

    predictions [N, E] probabilities; actual [N, K] expert ids (-1 = none)."""
    if len(predictions) == 0:
        return 0.0
    top = np.argsort(-predictions, axis=1, kind="stable")[:, :top_k]  # [N, top_k]
    return float(guessed(actual, top).sum() / max((actual >= 0).sum(), 1))


def path_accuracy(predictor: PathPredictor, trace: Trace, block: int = 1024) -> np.ndarray:
    """[L] per target layer: the share of its chosen experts that were in the predicted top-k,
    predicting each token's layer l+d from its sets at l and l-1 (`prediction_accuracy`); 0 for
    the first d layers, which nothing precedes by that much."""
    L, K, d, E = trace.meta.layers, trace.meta.top_k, predictor.distance, trace.meta.num_experts
    preds = np.concatenate([predictor.predict_paths(trace.experts[i:i + block])
                            for i in range(0, trace.num_tokens, block)]) if trace.num_tokens \
        else np.zeros((0, L - d, E))
    out = np.zeros(L)
    for layer in range(L - d):
        out[layer + d] = prediction_accuracy(preds[:, layer], trace.experts[:, layer + d], K)
    return out
