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

from haq.errors import NOT_FINITE, HaqError


CE_CHUNK = 256  # positions per float64 cross-entropy


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
    """Summed NLL (float64) of tokens 1..L-1 of one window given their prefixes. The float64 loss
    runs over CE_CHUNK positions at a time: a whole window's logits in float64 (plus its log-softmax)
    would be 4x the model's own logits, 10 GB for a 262k vocabulary at seqlen 2048."""
    device = next(model.parameters()).device
    ids = window[None].to(device)
    logits = model(ids, use_cache=False).logits[0, :-1]
    targets = ids[0, 1:]
    nll = 0.0
    for start in range(0, targets.numel(), CE_CHUNK):
        chunk = logits[start : start + CE_CHUNK].double()
        nll += float(torch.nn.functional.cross_entropy(chunk, targets[start : start + CE_CHUNK], reduction="sum"))
    return nll, ids.shape[1] - 1


def perplexity(model, windows: torch.Tensor, progress: bool = True) -> PerplexityResult:
    """windows: LongTensor [n, seqlen] of token ids."""
    start = time.perf_counter()
    nll_sum, count = 0.0, 0
    for i, window in enumerate(tqdm(windows, desc="perplexity", disable=not progress, leave=False)):
        nll, n = window_nll(model, window)
        if not math.isfinite(nll):
            raise HaqError(f"window {i}: the loss is {nll}: {NOT_FINITE}")
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
