"""Perplexity over non-overlapping windows (GPTQ protocol), negative log-likelihood summed in float64.

Each window of seqlen tokens is an independent forward pass; every token but the first of a window
is predicted, and PPL = exp(sum NLL / number of predicted tokens).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm


@dataclass
class PerplexityResult:
    ppl: float
    nll_sum: float
    tokens: int
    windows: int
    seqlen: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def window_nll(model, window: torch.Tensor) -> tuple[float, int]:
    """Summed NLL (float64) of tokens 1..L-1 of one window given their prefixes."""
    device = next(model.parameters()).device
    ids = window[None].to(device)
    logits = model(ids, use_cache=False).logits[0, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
    return float(nll), ids.shape[1] - 1


def perplexity(model, windows: torch.Tensor, progress: bool = True) -> PerplexityResult:
    """windows: LongTensor [n, seqlen] of token ids."""
    start = time.perf_counter()
    nll_sum, count = 0.0, 0
    for window in tqdm(windows, desc="perplexity", disable=not progress, leave=False):
        nll, n = window_nll(model, window)
        nll_sum += nll
        count += n
    return PerplexityResult(
        ppl=math.exp(nll_sum / count),
        nll_sum=nll_sum,
        tokens=count,
        windows=len(windows),
        seqlen=windows.shape[1],
        seconds=time.perf_counter() - start,
    )
