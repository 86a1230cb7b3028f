"""What a replay's prefetch knows ahead of each decode step: the predicted experts of a later
layer, from profile paths, recorded pre-gating, or the replayed routing itself (the ceiling)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np

from haq.errors import HaqError
from haq.runtime.prefetch import (PREFETCH_DISTANCE, PathPredictor, pregate_accuracy, pregate_distance,
                                  pregate_probabilities)
from haq.runtime.trace import Trace

if TYPE_CHECKING:
    from haq.sim.timeline import Step

PrefetchSource = Literal["auto", "path", "pregate", "oracle", "off"]
PREFETCH_SOURCES: tuple[str, ...] = get_args(PrefetchSource)


@dataclass(frozen=True)
class Lookahead:
    """What a replay's prefetch knows: `probs(steps)` [len(steps), L - distance, E], [s, l] the
    probability that each expert is called at layer l + `distance` of one-token step s, used when
    its layer l runs. It depends on the trace alone, not on the policy's state, so the replay asks
    for a block of steps at once (`PREDICT_BLOCK`)."""

    distance: int
    probs: Callable[[Sequence[Step]], np.ndarray]
    source: str


PREDICT_BLOCK = 64  # steps predicted in one batch: the per-call overhead gone, a few MB of arrays


def path_lookahead(predictor: PathPredictor) -> Lookahead:
    """Profile path statistics, given the step's sets at l and l-1."""
    def probs(steps: Sequence[Step]) -> np.ndarray:
        return predictor.predict_paths(np.stack([st.experts for st in steps]))
    return Lookahead(predictor.distance, probs, "path")


def pregate_lookahead(accuracy: np.ndarray, distance: int, num_experts: int, top_k: int) -> Lookahead:
    """The replayed trace's recorded pre-gate predictions, calibrated by each layer's `accuracy`
    measured on the profile part (`pregate_accuracy`)."""
    def probs(steps: Sequence[Step]) -> np.ndarray:
        return np.stack([[pregate_probabilities(st.pregate[target], float(accuracy[target]), num_experts, top_k)
                          for target in range(distance, len(st.pregate))] for st in steps])
    return Lookahead(distance, probs, "pregate")


def oracle_lookahead(num_experts: int, distance: int) -> Lookahead:
    """The replayed routing itself (probability 1 for the experts layer l+d calls): the ceiling of
    what any predictor could let prefetch save, not a policy anyone can run."""
    def probs(steps: Sequence[Step]) -> np.ndarray:
        out = np.zeros((len(steps), len(steps[0].calls) - distance, num_experts))
        for rows, st in zip(out, steps):
            for row, calls in zip(rows, st.calls[distance:]):
                row[[e for e, _ in calls]] = 1.0
        return out
    return Lookahead(distance, probs, "oracle")


def lookahead_for(kind: PrefetchSource, profile: Trace, replayed: Trace,
                  distance: int = PREFETCH_DISTANCE) -> Lookahead | None:
    """The prediction a replay's prefetch uses, learned from `profile` only: "pregate" (recorded by
    `haq trace`, at the distance it was recorded, calibrated per layer on the profile), "path"
    (`PathPredictor`), "oracle" (a ceiling), "off"; "auto": pregate when both traces have it."""
    if kind not in PREFETCH_SOURCES:
        raise HaqError(f"unknown prefetch source {kind!r}; choose from {list(PREFETCH_SOURCES)}")
    L = profile.meta.layers
    if kind == "off" or L < 2:
        return None
    if kind == "auto":
        kind = "pregate" if profile.pregate is not None and replayed.pregate is not None else "path"
    E, K = profile.meta.num_experts, profile.meta.top_k
    if kind == "pregate":
        d = pregate_distance(replayed)
        if pregate_distance(profile) != d:
            raise HaqError(f"the profile trace's pre-gate looks {pregate_distance(profile)} layer(s) ahead, "
                           f"the replayed trace's {d}: record both with the same distance")
        return pregate_lookahead(pregate_accuracy(profile), d, E, K)
    distance = min(distance, L - 1)
    if kind == "oracle":
        return oracle_lookahead(E, distance)
    return path_lookahead(PathPredictor.from_trace(profile, distance))
