"""Calibration statistics of one linear input: per-channel abs-max, the Hessian 2/n sum x x^T and a
few input tokens.
Smoothing by s maps both exactly (X -> X / s), so one pass over the float layer serves smoothing
and GPTQ alike."""
from __future__ import annotations

from collections.abc import Callable

import torch

from haq.errors import HaqError
from haq.quant.gptq import accumulate_hessian


class InputStats:
    def __init__(self, name: str, hessian: bool = True, sample_tokens: int = 0):
        self.name = name
        self.want_hessian = hessian
        self.sample_tokens = sample_tokens
        self.sample: torch.Tensor | None = None  # the first `sample_tokens` inputs [T, C]: haq's alpha proxy
        self.act_max: torch.Tensor | None = None  # [C]
        self.H: torch.Tensor | None = None  # [C, C]
        self.tokens = 0
        self.divisor: torch.Tensor | None = None  # the smoothing applied so far (X -> X / divisor), [C]

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if x.numel() == 0:
            return
        cur = x.abs().amax(0)
        if not torch.isfinite(cur).all():  # amax propagates NaN and Inf: one check per channel suffices
            raise HaqError(f"NaN or Inf in calibration activations entering {self.name}; "
                           "check the model weights and the calibration text")
        self.act_max = cur if self.act_max is None else torch.maximum(self.act_max, cur)
        if self.sample_tokens:
            kept = 0 if self.sample is None else self.sample.shape[0]
            if kept < self.sample_tokens:
                new = x[: self.sample_tokens - kept].clone()
                self.sample = new if self.sample is None else torch.cat([self.sample, new])
        if self.want_hessian:
            self.H, self.tokens = accumulate_hessian(self.H, self.tokens, x)
        else:
            self.tokens += x.shape[0]

    def smoothed(self, s: torch.Tensor) -> None:
        """Apply X -> X / s to the recorded statistics (H -> diag(1/s) H diag(1/s))."""
        inv = 1.0 / s.float()
        self.divisor = s.float() if self.divisor is None else self.divisor * s.float()
        if self.act_max is not None:
            self.act_max = self.act_max * inv
        if self.H is not None:
            self.H = self.H * inv[:, None] * inv[None, :]
        if self.sample is not None:
            self.sample = self.sample * inv


def shrunk_hessian(stats: list[InputStats], prior_tokens: float) -> Callable[[int], torch.Tensor | None]:
    """e -> the Hessian of `stats[e]` (the same input kind in every expert of a layer, e.g. every
    down input) shrunk toward their token-weighted pool: (n_e H_e + n0 P_e) / (n_e + n0), n0 =
    `prior_tokens`. An expert routed few tokens has a noisy, rank-deficient Hessian that GPTQ
    overfits; the pool (all experts' inputs) is the low-variance estimate it leans on. Statistics
    smoothed by different scales are pooled unsmoothed (H_raw = D H D) and the pool brought back
    to each expert's own smoothing, so every H_e stays the Hessian of the inputs it will see.
    One pooled matrix is kept; each shrunk H is made when asked for."""
    live = [st for st in stats if st.H is not None and st.tokens > 0]
    if prior_tokens <= 0 or len(live) < 2:
        return lambda e: stats[e].H

    def divisor(st: InputStats) -> torch.Tensor:
        return st.divisor if st.divisor is not None else torch.ones(st.H.shape[0], device=st.H.device)

    total = sum(st.tokens for st in live)
    pool = torch.zeros_like(live[0].H)
    for st in live:
        d = divisor(st)
        pool += st.H * d[:, None] * d[None, :] * (st.tokens / total)

    def shrunk(e: int) -> torch.Tensor | None:
        st = stats[e]
        if st.H is None or st.tokens == 0:
            return st.H
        inv = 1.0 / divisor(st)
        return (st.tokens * st.H + prior_tokens * pool * inv[:, None] * inv[None, :]) / (st.tokens + prior_tokens)

    return shrunk
