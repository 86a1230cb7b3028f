"""SmoothQuant migration scales and the adaptive-alpha search, as pure tensor math.

Smoothing moves activation outliers into the weights with an exact rewrite: for a per-input-
channel ``s > 0``, ``X @ W^T == (X / s) @ (W * s)^T``. The consumers' weight *columns* are
multiplied by ``s`` (:func:`scale_weight_columns`); the producer of ``X`` absorbs ``1 / s``
(:func:`divide_producer`): a norm's weight (and bias), or the *rows* (and bias) of the previous
linear. One ``s`` is shared by every consumer of the same ``X`` (q/k/v; gate/up of every expert
and the router), so the rewrite stays exact.

Which modules form a group, and the calibration that produces ``act_max``, live in the pipeline
and the architecture maps; the score used by :func:`best_alpha` is supplied by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from haq.errors import HaqError

SCALE_MIN = 1e-5
"""Lower clamp on s (as SmoothQuant): keeps X / s finite for channels with tiny activations."""


def smooth_scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel migration scales s [in], float32.

    ``alpha`` = 0 leaves activations alone and flattens the weights; 1 moves all activation range
    into the weights. Dead channels (``act_max == 0`` or ``weight_max == 0``, or non-finite) get
    ``s = 1``: there is nothing to balance, and 0^alpha / 0^(1-alpha) would be 0, inf or NaN.
    """
    if not 0.0 <= alpha <= 1.0:
        raise HaqError(f"smoothing alpha must be in [0, 1], got {alpha}")
    if act_max.shape != weight_max.shape or act_max.dim() != 1:
        raise HaqError(
            f"act_max and weight_max must both be [in]; got {tuple(act_max.shape)} and {tuple(weight_max.shape)}"
        )
    a = act_max.detach().float().abs()
    w = weight_max.detach().to(a.device).float().abs()
    # s_j = max|X_j|^alpha / max|W_j|^(1-alpha)
    s = (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=SCALE_MIN)
    dead = (a == 0) | (w == 0) | ~torch.isfinite(s)
    return torch.where(dead, torch.ones_like(s), s)


def weight_max_over(linears_weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-input-channel ``max |W_ij|`` over the rows of all consumer weights [out_k, in], float32 [in]."""
    if len(linears_weights) == 0:
        raise HaqError("a smoothing group needs at least one consumer linear")
    ins = {W.shape[-1] for W in linears_weights}
    if len(ins) != 1 or any(W.dim() != 2 for W in linears_weights):
        raise HaqError(f"consumer weights must be 2-D with one shared input size; got {[tuple(W.shape) for W in linears_weights]}")
    return torch.stack([W.detach().abs().amax(dim=0).float() for W in linears_weights]).amax(dim=0)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype: float32 for half types (then cast back), float64 kept as is."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scale_weight_columns(W: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Consumer side of the rewrite: ``W * s`` (column j times s_j), same dtype as ``W``."""
    acc = _acc(W.dtype)
    return (W.to(acc) * s.to(acc).reshape(1, -1)).to(W.dtype)


def divide_producer(
    weight: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Producer side of the rewrite: output channel j divided by s_j.

    ``weight`` is a norm's weight [in] or a previous linear's weight [in, k] (its rows are the
    channels this group consumes); ``bias`` [in] is divided too. Returns new tensors.
    """
    if weight.shape[0] != s.shape[0]:
        raise HaqError(f"producer has {weight.shape[0]} output channels, scales have {s.shape[0]}")
    shape = (-1,) + (1,) * (weight.dim() - 1)
    acc = _acc(weight.dtype)
    new_w = (weight.to(acc) / s.to(acc).reshape(shape)).to(weight.dtype)
    new_b = None if bias is None else (bias.to(acc) / s.to(acc)).to(bias.dtype)
    return new_w, new_b


def alpha_grid(step: float = 0.05) -> list[float | None]:
    """Candidates for the adaptive search: None (no smoothing), then 0, step, ..., 1."""
    n = round(1 / step) if step > 0 else 0
    if n < 1 or not math.isclose(n * step, 1.0, rel_tol=1e-9):
        raise HaqError(f"alpha step must divide 1 evenly (e.g. 0.05, 0.1, 0.25), got {step}")
    return [None] + [round(i / n, 10) for i in range(n + 1)]


def _lowest(scores: dict[float | None, float]) -> float | None:
    """The lowest-scoring candidate, first on ties; NaN never wins; all NaN raises."""
    live = [(score, i, alpha) for i, (alpha, score) in enumerate(scores.items()) if not math.isnan(score)]
    if not live:
        raise HaqError(f"every smoothing alpha scored NaN ({len(scores)} tried); check the calibration inputs")
    return min(live)[2]


def best_alpha(
    score_fn: Callable[[float | None], float], grid: Sequence[float | None]
) -> tuple[float | None, dict[float | None, float]]:
    """Score every candidate, return the lowest-scoring one (first on ties) and all scores.

    NaN scores (a candidate that broke numerically) never win; if all are NaN, raise.
    """
    scores = {alpha: float(score_fn(alpha)) for alpha in grid}
    return _lowest(scores), scores


def coarse_to_fine_alpha(
    score_fn: Callable[[float | None], float], step: float = 0.05
) -> tuple[float | None, dict[float | None, float]]:
    """The grid of :func:`alpha_grid` searched hierarchically: None and every 4th-or-so grid point
    first, then the neighbours of the best point at half the spacing, down to ``step``.

    On a score that is unimodal in alpha (the usual shape of quantization error against migration
    strength) this finds the exhaustive grid's minimum with about half the evaluations (11 instead
    of 22 for step 0.05); grids of up to 7 points are searched exhaustively.
    """
    grid = alpha_grid(step)
    n = len(grid) - 2  # levels 0..n map to alpha = level / n
    stride = 1
    while n // (2 * stride) >= 4:
        stride *= 2
    levels = sorted(set(range(0, n + 1, stride)) | {n})
    scores = {None: float(score_fn(None))}
    level_scores = {level: float(score_fn(grid[level + 1])) for level in levels}
    while stride > 1:
        stride //= 2
        best = _lowest({lv: sc for lv, sc in level_scores.items()})
        for level in (best - stride, best + stride):
            if 0 <= level <= n and level not in level_scores:
                level_scores[level] = float(score_fn(grid[level + 1]))
    scores.update({grid[level + 1]: score for level, score in sorted(level_scores.items())})
    return _lowest(scores), scores


def proxy_pruned_alpha(
    score_fn: Callable[[float | None], float], proxy_fn: Callable[[float | None], float],
    step: float = 0.05, keep: int = 3,
) -> tuple[float | None, dict[float | None, float]]:
    """Every grid candidate ranked by a cheap proxy; ``score_fn`` (the expensive score that decides)
    evaluates only the ``keep`` best of them and None (no smoothing), so the choice is never worse
    than not smoothing by that score. Returns the choice and the decisive scores."""
    if keep < 1:
        raise HaqError(f"the proxy search must keep at least one candidate, got {keep}")
    grid = alpha_grid(step)
    proxies = {alpha: float(proxy_fn(alpha)) for alpha in grid}
    ranked = sorted(grid, key=lambda a: (math.isnan(proxies[a]), proxies[a]))
    decisive = [None] + [alpha for alpha in ranked[:keep] if alpha is not None]
    scores = {alpha: float(score_fn(alpha)) for alpha in decisive}
    return _lowest(scores), scores
