"""GPTQ as a pure solver: statistics in (``H``), quantized weights out.

Two phases, as in IST-DASLab/gptq (``add_batch`` / ``fasterquant``): the caller streams layer
inputs through :func:`accumulate_hessian`, then calls :func:`gptq_quantize` once. This module knows
nothing about models, hooks or names; the pipeline owns those (and the warning on fallback).

Notation (Frantar et al., 2022), for one linear ``y = W x`` with ``W [out, in]``:

- ``H = 2/n * sum_t x_t x_t^T``  [in, in], the Hessian of the layer's squared output error.
- ``Hinv`` = upper Cholesky factor of ``(H + damp*I)^-1``; row ``i`` of it, divided by its diagonal
  ``d = Hinv[i, i]``, is the OBS update direction after column ``i`` is quantized.
- Column by column: ``q = quant(w_i)``, ``Err_i = (w_i - q) / d``,
  ``W[:, i:] -= Err_i Hinv[i, i:]``; the loss estimate is ``sum (w_i - q)^2 / d^2 / 2``.
- Lazy batch updates: the trailing columns outside the current block are updated once per block
  with ``W[:, i2:] -= Err[:, i1:i2] @ Hinv[i1:i2, i2:]`` (same result as column by column).

The grid is haq's symmetric per-output-channel RTN grid (:mod:`haq.kernels.grid`), with the scales
fixed from the original ``W`` before the solve, like GPTQ's per-channel ``find_params`` on the
full weight; the updated weights are clamped to that grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from haq.errors import HaqError
from haq.kernels.grid import dequantize_weight, qmax_for, quantize_weight, weight_scales

DAMP_TRIES = 6
"""Damping attempts: percdamp * mean(diag H) times 1, 10, ..., 10^5, then RTN fallback."""


@dataclass
class GPTQResult:
    """What one GPTQ solve produced; every tensor is in the original column order."""

    qweight: torch.Tensor
    """Integer levels [out, in], int8, in [-qmax, qmax]."""
    scale: torch.Tensor
    """Per-output-channel scales [out], float32."""
    loss: float
    """GPTQ's estimate ``sum (w - q)^2 / d^2 / 2``; NaN on fallback (no usable ``Hinv``)."""
    damp: float
    """Absolute damping added to diag(H) in the successful attempt (the last one tried on fallback)."""
    fallback: bool
    """True when no damping made ``H`` factorizable and ``Q`` is plain RTN: the caller must warn."""
    dtype: torch.dtype = torch.float32
    """The solve's arithmetic (float64 if ``W`` was)."""

    @property
    def Q(self) -> torch.Tensor:
        """Dequantized weights ``qweight * scale`` [out, in] in the solve's dtype, made when asked
        for: the pipeline keeps only the integers, and at Mixtral width each copy is 0.5 GB."""
        return dequantize_weight(self.qweight, self.scale, self.dtype)


def accumulate_hessian(H: torch.Tensor | None, nsamples: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fold a batch of layer inputs ``x [..., in]`` into the running ``H = 2/n * sum_t x_t x_t^T``.

    Returns the updated ``(H, nsamples)``; ``H`` (float32) is updated in place, or created when
    None. Unlike IST-DASLab/gptq, which counts sequences, ``nsamples`` counts tokens (rows of
    ``x``): MoE experts see a different number of routed tokens per call, and counting tokens keeps
    every token equally weighted. The overall scale of ``H`` does not change the solution (damping
    is relative to mean(diag H)).
    """
    x = x.detach().reshape(-1, x.shape[-1])
    n = x.shape[0]
    if H is None:
        H = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    if H.shape != (x.shape[1], x.shape[1]):
        raise HaqError(f"Hessian shape {tuple(H.shape)} does not match input features {x.shape[1]}")
    if n == 0:
        return H, nsamples
    # H_new = n_old/(n_old+n) * H_old + 2/(n_old+n) * X^T X
    H.mul_(nsamples / (nsamples + n))
    nsamples += n
    x = math.sqrt(2 / nsamples) * x.to(device=H.device, dtype=torch.float32)
    H.addmm_(x.t(), x)
    return H, nsamples


def _damp_schedule(mean_diag: float, percdamp: float) -> list[float]:
    """Damping values to try, smallest first: percdamp * mean(diag H) * 10^k."""
    base = percdamp * mean_diag
    damps = [base * 10**k for k in range(DAMP_TRIES)]
    if percdamp == 0:  # "no damping" first, then the default 1% ladder rather than 0 forever
        damps = [0.0] + [0.01 * mean_diag * 10**k for k in range(DAMP_TRIES - 1)]
    return damps


def _hinv_cholesky(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor of ``(H + damp*I)^-1`` with the smallest damp that works.

    Returns ``(Hinv, damp)``, or ``(None, last_damp)`` when every attempt failed.
    """
    mean_diag = torch.diag(H).mean().item()
    if not math.isfinite(mean_diag) or mean_diag <= 0:
        return None, float("nan")
    damp = float("nan")
    flip = torch.arange(H.shape[0] - 1, -1, -1, device=H.device)
    for damp in _damp_schedule(mean_diag, percdamp):  # at most two [in, in] matrices besides H at a time
        damped = H[flip[:, None], flip[None, :]]  # J H J, J the order reversal
        damped.diagonal().add_(damp)
        L, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info.item() != 0:
            continue
        # J H J = L L^T gives H = V V^T with V = J L J upper triangular, so H^-1 = U^T U with
        # U = V^-1 = J L^-1 J: the upper Cholesky factor of H^-1 from one factorization and one
        # triangular inverse (2/3 d^3 flops, not the 4/3 d^3 of factor, invert, factor again)
        Hinv = lower_triangular_inverse(L)[flip[:, None], flip[None, :]]
        del L
        if bool(torch.isfinite(Hinv).all()) and bool((Hinv.diagonal() > 0).all()):
            return Hinv, damp
    return None, damp


TRIANGULAR_LEAF = 256


def lower_triangular_inverse(L: torch.Tensor) -> torch.Tensor:
    """L^-1 for lower-triangular L, by halves: [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]],
    so the work is matrix products (d^3 / 3 multiply-adds) rather than a triangular solve against
    the identity (d^3 / 2)."""
    n = L.shape[0]
    if n <= TRIANGULAR_LEAF:
        eye = torch.eye(n, dtype=L.dtype, device=L.device)
        return torch.linalg.solve_triangular(L, eye, upper=False)
    h = n // 2
    out = torch.zeros_like(L)
    A_inv, C_inv = lower_triangular_inverse(L[:h, :h]), lower_triangular_inverse(L[h:, h:])
    out[:h, :h], out[h:, h:] = A_inv, C_inv
    out[h:, :h] = -(C_inv @ (L[h:, :h] @ A_inv))
    return out


def _native_loop(Wt: torch.Tensor):
    """The C kernels when they can run this solve's column loop (float32 on the CPU), else None."""
    if Wt.dtype != torch.float32 or Wt.device.type != "cpu":
        return None
    from haq.kernels.cpu import library

    return library()


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int = 8,
    blocksize: int = 128,
    percdamp: float = 0.01,
    actorder: bool = True,
    scale: torch.Tensor | None = None,
) -> GPTQResult:
    """Quantize ``W [out, in]`` to ``bits`` minimizing ``||W X - Q X||^2`` under ``H`` (GPTQ).

    - Dead columns (``H_ii == 0``: an input that was always zero) get ``H_ii = 1`` and ``W[:, i] = 0``.
    - Damping starts at ``percdamp * mean(diag H)`` and is multiplied by 10 until the Cholesky
      factorizations succeed (``DAMP_TRIES`` attempts); if none does, the result is RTN with
      ``fallback=True``.
    - ``actorder`` quantizes columns in descending ``diag(H)`` order (largest activations first,
      while there are still many columns left to absorb their error) and undoes the permutation.
    - ``scale`` defaults to the RTN per-channel scales of the original ``W``.

    Arithmetic is float32 (float64 when ``W`` is float64), on ``W``'s device. Inputs are not
    modified.
    """
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise HaqError(f"GPTQ needs W [out, in] and H [in, in]; got {tuple(W.shape)} and {tuple(H.shape)}")
    if blocksize < 1:
        raise HaqError(f"blocksize must be >= 1, got {blocksize}")
    if percdamp < 0:
        raise HaqError(f"percdamp must be >= 0, got {percdamp}")
    qmax = qmax_for(bits)
    work = torch.float64 if W.dtype == torch.float64 else torch.float32
    W0 = W.detach().to(work)
    if scale is None:
        scale = weight_scales(W0, bits)  # from the original W: static per-channel grid
    scale = scale.detach().to(device=W.device, dtype=torch.float32).reshape(-1)
    if scale.shape[0] != W.shape[0]:
        raise HaqError(f"scale has {scale.shape[0]} entries, W has {W.shape[0]} output channels")

    H = H.detach().to(device=W.device, dtype=work)
    ncols = W.shape[1]
    dead = torch.diag(H) == 0
    if actorder:  # one permuted copy of W and of H (a Mixtral expert's down Hessian is 0.8 GB)
        diag = torch.diag(H).masked_fill(dead, 1)
        perm = torch.argsort(diag, descending=True, stable=True)
        W, H, dead = W0[:, perm], H[perm[:, None], perm[None, :]], dead[perm]
    else:
        W, H = W0.clone(), H.clone()
    H[dead, dead] = 1
    W[:, dead] = 0

    Hinv, damp = _hinv_cholesky(H, percdamp)
    if Hinv is None:
        qweight = quantize_weight(W0, scale, bits)
        return GPTQResult(qweight, scale, float("nan"), damp, True, work)
    del H

    # Columns of W are rows of Wt: every per-column step below reads and writes contiguous memory,
    # and the loss is summed once per block from the scaled errors ((w - q) / d)^2 / 2.
    s = scale.to(work).contiguous()
    Wt = W.t().contiguous()
    del W
    native = _native_loop(Wt)
    Qt = torch.empty_like(Wt)
    loss = torch.zeros((), dtype=work, device=Wt.device)
    for i1 in range(0, ncols, blocksize):
        i2 = min(i1 + blocksize, ncols)
        W1, Q1 = Wt[i1:i2], Qt[i1:i2]
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if native is not None:
            Hinv1 = Hinv1.contiguous()
            native.haq_gptq_block(W1.data_ptr(), Hinv1.data_ptr(), s.data_ptr(), i2 - i1, W1.shape[1], float(qmax),
                                  Q1.data_ptr(), Err1.data_ptr())
        for i in range(0 if native is None else i2 - i1, i2 - i1):
            w = W1[i]
            q = torch.round(w / s).clamp_(-qmax, qmax)
            Q1[i] = q
            # Err_i = (w_i - q_i) / d ;  W[:, i:] -= Err_i Hinv[i, i:]
            err = torch.sub(w, q * s).div_(Hinv1[i, i])
            Err1[i] = err
            W1[i + 1:].addr_(Hinv1[i, i + 1:], err, alpha=-1)
        loss += Err1.square().sum() / 2
        # lazy batch update of the columns after this block
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)
    Qint = Qt.t()

    if actorder:
        invperm = torch.argsort(perm)
        Qint = Qint[:, invperm]
    qweight = Qint.to(torch.int8)
    return GPTQResult(
        dtype=work,
        qweight=qweight,
        scale=scale,
        loss=loss.item(),
        damp=damp,
        fallback=False,
    )
