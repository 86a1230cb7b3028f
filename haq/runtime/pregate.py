"""Pre-gating in the engine: when MoE layer l runs, layer l + d's router is applied to layer l's MoE
input (the residual stream changes little over d layers). Its top-k is scored when layer l + d
really routes, turned into calibrated probabilities for the policy's prefetch (the accuracy so far,
with a Laplace prior), and kept per forward next to the routing for `Engine.last_trace`."""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from haq.runtime.prefetch import PREFETCH_DISTANCE, guessed, pregate_rates


class PreGate:
    def __init__(self, routers: list[nn.Module], choices: Callable, top_k: int, num_experts: int) -> None:
        self.routers, self.choices = routers, choices
        self.top_k, self.num_experts = top_k, num_experts
        self.distance = min(PREFETCH_DISTANCE, len(routers) - 1)  # 0: one MoE layer, nothing to pre-gate
        self.layer_s = 0.0  # moving average of one MoE layer's duration: a prefetch's lead is d of them
        self.last_layer_s = 0.0  # the last one's: the lead of prefill copies a layer ahead (the simulator's)
        self._started: tuple[int, float] | None = None  # (MoE layer, when it started)
        self.reset()

    def reset(self) -> None:
        n = len(self.routers)
        self.log: list[list[torch.Tensor]] = [[] for _ in range(n)]  # per layer, per forward: the guess or -1
        self.pending: list[torch.Tensor | None] = [None] * n  # the guess waiting for each layer's routing
        self.hits, self.total = [0] * n, [0] * n

    def start_layer(self, layer: int) -> None:
        """Time consecutive MoE layers of a step: the last interval, and its moving average."""
        now = time.perf_counter()
        previous, started = self._started or (-2, now)
        if layer == previous + 1:
            step = now - started
            self.last_layer_s = step
            self.layer_s = step if self.layer_s == 0.0 else 0.9 * self.layer_s + 0.1 * step
        self._started = (layer, now)

    def score(self, layer: int, top_k_index: torch.Tensor, record: bool) -> None:
        """Compare the routing of `layer` with the guess made d layers earlier (and keep it)."""
        guess = self.pending[layer]
        self.pending[layer] = None
        if guess is None or guess.shape[0] != top_k_index.shape[0]:
            if record:
                self.log[layer].append(torch.full_like(top_k_index, -1, dtype=torch.int16, device="cpu"))
            return
        actual = top_k_index.to("cpu").numpy()
        self.hits[layer] += int(guessed(actual, guess.numpy()).sum())
        self.total[layer] += actual.size
        if record:
            self.log[layer].append(guess.to(torch.int16))

    def predict(self, layer: int, hidden: torch.Tensor) -> tuple[int, np.ndarray, float] | None:
        """(target layer, [E] P(some token calls each expert there), lead seconds), or None past the end."""
        target = layer + self.distance
        if not self.distance or target >= len(self.routers):
            return None
        guess = self.choices(self.routers[target].forward(hidden))[0].to("cpu")  # [T, K]
        self.pending[target] = guess
        accuracy = (self.hits[target] + 1.0) / (self.total[target] + 2.0)  # 0.5 before any evidence
        E, T = self.num_experts, guess.shape[0]
        hit, miss = pregate_rates(accuracy, E, self.top_k)
        voted = np.bincount(guess.reshape(-1).numpy(), minlength=E)[:E]  # tokens whose top-k holds e
        # P(called by some token) = 1 - prod over tokens of P(not called by it)
        probs = 1.0 - (1.0 - hit) ** voted * (1.0 - miss) ** (T - voted)
        return target, probs, self.layer_s * self.distance

    def accuracy(self) -> list[float]:
        return [h / t if t else 0.0 for h, t in zip(self.hits, self.total)]

    def recorded(self, tokens: int) -> np.ndarray | None:
        """[T, L, K] of every recorded forward, or None when some forward went around the module path
        (native decode steps) or nothing is pre-gated."""
        if not self.distance or any(sum(len(c) for c in log) != tokens for log in self.log):
            return None
        return torch.stack([torch.cat(c) for c in self.log], dim=1).numpy()
