"""Invariants of the pure quantization math: RTN grid, GPTQ solver, SmoothQuant scales."""

from __future__ import annotations

import math

import pytest
import torch

from haq.errors import HaqError
from haq.quant.gptq import accumulate_hessian, gptq_quantize
from haq.kernels.grid import (
    dequantize_weight,
    fake_quant_act,
    fake_quant_weight,
    quantize_act_per_tensor,
    quantize_act_per_token,
    quantize_weight,
    weight_scales,
)
from haq.quant.smooth_scales import (
    alpha_grid,
    best_alpha,
    coarse_to_fine_alpha,
    proxy_pruned_alpha,
    divide_producer,
    scale_weight_columns,
    smooth_scales,
    weight_max_over,
)

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------- RTN


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_weight_rtn_round_trip_within_half_step(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(32, 64, generator=g) * torch.logspace(-3, 1, 32).reshape(-1, 1)
    qmax = 2 ** (bits - 1) - 1
    scale = weight_scales(W, bits)
    torch.testing.assert_close(scale, W.abs().amax(1) / qmax)  # scale = absmax / qmax
    q = quantize_weight(W, scale, bits)
    assert q.dtype == torch.int8
    assert q.abs().max().item() == qmax  # the absmax element of each row lands on +-qmax
    assert (q.abs().amax(1) == qmax).all()
    err = (fake_quant_weight(W, bits) - W).abs()
    assert (err <= scale.reshape(-1, 1) / 2 * (1 + 1e-5)).all()


def test_weight_zero_row_and_external_scale_clamp() -> None:
    W = torch.randn(4, 16)
    W[2] = 0
    scale = weight_scales(W)
    assert torch.isfinite(scale).all() and scale[2] > 0
    fq = fake_quant_weight(W)
    assert torch.isfinite(fq).all() and (fq[2] == 0).all()
    # a scale not computed from W (as after GPTQ updates) saturates at +-qmax
    q = quantize_weight(W * 3, scale)
    assert q.abs().max().item() == 127
    assert dequantize_weight(q, scale).dtype == torch.float32


def test_bits_out_of_range_is_a_user_error() -> None:
    with pytest.raises(HaqError, match="bits"):
        weight_scales(torch.randn(2, 2), 9)
    with pytest.raises(HaqError, match="bits"):
        quantize_act_per_token(torch.randn(2, 2), 1)


def test_per_token_quant_zero_rows_and_bounds() -> None:
    x = torch.randn(2, 5, 32) * 4
    x[0, 3] = 0
    x[1, 0] = 0
    q, scale = quantize_act_per_token(x)
    assert q.dtype == torch.int8 and q.shape == x.shape and scale.shape == (2, 5, 1)
    assert torch.isfinite(scale).all()
    assert (q[0, 3] == 0).all() and (q[1, 0] == 0).all()
    torch.testing.assert_close(scale[0, 0, 0], x[0, 0].abs().max() / 127)
    fq = fake_quant_act(x, 8, "per-token")
    assert not torch.isnan(fq).any()
    assert ((fq - x).abs() <= scale / 2 * (1 + 1e-5)).all()


def test_per_tensor_static_scale_saturates() -> None:
    x = torch.tensor([[0.5, -1.0, 4.0]])
    q, s = quantize_act_per_tensor(x, 8, static_scale=1.0 / 127)  # covers [-1, 1]
    assert q.tolist() == [[64, -127, 127]]
    fq = fake_quant_act(x, 8, "per-tensor", static_scale=1.0 / 127)
    assert fq[0, 2].item() == pytest.approx(1.0)
    dyn = fake_quant_act(x, 8, "per-tensor")
    assert dyn[0, 2].item() == pytest.approx(4.0)
    assert torch.equal(fake_quant_act(torch.zeros(3, 4), 8, "per-tensor"), torch.zeros(3, 4))
    with pytest.raises(HaqError, match="per-tensor"):
        fake_quant_act(x, 8, "per-token", static_scale=1.0)


# ---------------------------------------------------------------------------------------- GPTQ


def correlated_inputs(n: int, k: int, seed: int) -> torch.Tensor:
    """Low-rank-plus-noise activations with a few outlier channels, like real LLM inputs."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, k // 4, generator=g) @ torch.randn(k // 4, k, generator=g)
    X = X + 0.1 * torch.randn(n, k, generator=g)
    X[:, :3] *= 10
    return X


def hessian_of(X: torch.Tensor) -> torch.Tensor:
    H, n = accumulate_hessian(None, 0, X)
    assert n == X.reshape(-1, X.shape[-1]).shape[0]
    return H


def gptq_reference(W: torch.Tensor, H: torch.Tensor, bits: int, percdamp: float, actorder: bool) -> torch.Tensor:
    """Slow OBS reference in float64: explicit inverse Hessian, one column at a time, with the
    rank-1 downdate ``Hinv -= Hinv[:, i] Hinv[i, :] / Hinv[i, i]`` instead of a Cholesky factor."""
    qmax = 2 ** (bits - 1) - 1
    scale = weight_scales(W, bits).double().reshape(-1, 1)
    W = W.double().clone()
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if actorder else torch.arange(W.shape[1])
    W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    for i in range(W.shape[1]):
        w = W[:, i : i + 1]
        q = torch.round(w / scale).clamp(-qmax, qmax) * scale
        d = Hinv[i, i]
        W[:, i + 1 :] -= (w - q) / d @ Hinv[i : i + 1, i + 1 :]
        Hinv = Hinv - Hinv[:, i : i + 1] @ Hinv[i : i + 1, :] / d
        Q[:, i : i + 1] = q
    return Q[:, torch.argsort(perm)]


def test_accumulate_hessian_is_running_average_over_tokens() -> None:
    X = torch.randn(3, 10, 12, dtype=torch.float64)
    H, n = None, 0
    for chunk in (X[:1], X[1:2, :4], X[1:2, 4:], X[2:]):  # uneven batches, 3-D and 2-D
        H, n = accumulate_hessian(H, n, chunk if chunk.shape[1] != 6 else chunk[0])
    assert n == 30 and H.dtype == torch.float32
    Xf = X.reshape(-1, 12)
    torch.testing.assert_close(H.double(), 2 * Xf.T @ Xf / 30, rtol=1e-5, atol=1e-5)
    H2, n2 = accumulate_hessian(H, n, torch.zeros(0, 12))  # empty batch changes nothing
    assert n2 == 30 and torch.equal(H2, H)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("bits", [8, 4])
def test_gptq_beats_rtn_on_output_error(seed: int, bits: int) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    W = torch.randn(48, 96, generator=g)
    X = correlated_inputs(1024, 96, seed)
    res = gptq_quantize(W, hessian_of(X), bits=bits)
    assert not res.fallback and res.Q.shape == W.shape
    err_gptq = ((W - res.Q) @ X.T).norm()
    err_rtn = ((W - fake_quant_weight(W, bits)) @ X.T).norm()
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)
    # the OBS increments add up to the damped quadratic 1/2 tr(D (H + damp I) D^T), D = W - Q,
    # i.e. ||(W - Q) X^T||^2 / n plus the damping term
    H = hessian_of(X).double()
    D = (W - res.Q).double()
    quad = 0.5 * torch.trace(D @ (H + res.damp * torch.eye(96, dtype=torch.float64)) @ D.T).item()
    assert res.loss == pytest.approx(quad, rel=1e-3)


@pytest.mark.parametrize("actorder", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_gptq_matches_slow_reference_for_any_blocksize(actorder: bool, bits: int) -> None:
    W = torch.randn(16, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    X = correlated_inputs(256, 40, seed=7)
    X[:, 5] = 0  # a dead column too
    H = hessian_of(X).double()
    ref = gptq_reference(W, H, bits, 0.01, actorder)
    for blocksize in (128, 16, 7, 1):
        res = gptq_quantize(W, H, bits=bits, blocksize=blocksize, actorder=actorder)
        assert res.Q.dtype == torch.float64
        torch.testing.assert_close(res.Q, ref, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(res.Q, dequantize_weight(res.qweight, res.scale, torch.float64))


def test_gptq_float32_blocksize_invariance() -> None:
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    H = hessian_of(correlated_inputs(2048, 256, seed=3))
    a = gptq_quantize(W, H, blocksize=128)
    b = gptq_quantize(W, H, blocksize=1)
    assert a.Q.dtype == torch.float32 and a.qweight.dtype == torch.int8
    # float32 round-off may move an element across a rounding boundary; essentially all agree
    assert (a.qweight != b.qweight).float().mean().item() < 1e-3
    torch.testing.assert_close(a.Q, b.Q, rtol=0, atol=2 * a.scale.max().item())
    assert a.loss == pytest.approx(b.loss, rel=1e-3)


def test_gptq_does_not_modify_inputs_and_respects_given_scale() -> None:
    W = torch.randn(8, 24)
    H = hessian_of(correlated_inputs(128, 24, seed=1))
    W0, H0 = W.clone(), H.clone()
    scale = weight_scales(W) * 2  # a coarser grid chosen elsewhere
    res = gptq_quantize(W, H, scale=scale)
    assert torch.equal(W, W0) and torch.equal(H, H0)
    assert torch.equal(res.scale, scale)
    torch.testing.assert_close(res.Q, res.qweight.float() * scale.reshape(-1, 1))
    assert res.qweight.abs().max().item() <= 127


def test_gptq_dead_columns() -> None:
    X = correlated_inputs(256, 32, seed=5)
    X[:, [0, 9, 31]] = 0
    H = hessian_of(X)
    assert (torch.diag(H)[[0, 9, 31]] == 0).all()
    W = torch.randn(12, 32)
    res = gptq_quantize(W, H)
    assert not res.fallback and torch.isfinite(res.Q).all() and math.isfinite(res.loss)
    assert (res.Q[:, [0, 9, 31]] == 0).all() and (res.qweight[:, [0, 9, 31]] == 0).all()
    # all-dead H (a layer that only ever saw zeros) still solves
    res0 = gptq_quantize(W, torch.zeros(32, 32))
    assert not res0.fallback and (res0.Q == 0).all()


def indefinite_hessian(c: float, pairs: int = 4) -> torch.Tensor:
    """Block-diagonal [[1, c], [c, 1]] blocks: unit diagonal, eigenvalues 1 + c and 1 - c."""
    return torch.block_diag(*[torch.tensor([[1.0, c], [c, 1.0]])] * pairs)


def test_non_pd_hessian_raises_damping_until_cholesky_succeeds() -> None:
    W = torch.randn(6, 8)
    res = gptq_quantize(W, indefinite_hessian(1.0 + 50.0))  # min eigenvalue -50: needs damp > 50
    assert not res.fallback
    assert res.damp == pytest.approx(0.01 * 1.0 * 10**4)  # 0.01, 0.1, 1, 10 fail; 100 works
    assert torch.isfinite(res.Q).all()
    ok = gptq_quantize(W, hessian_of(correlated_inputs(64, 8, seed=0)))
    assert ok.damp == pytest.approx(0.01 * torch.diag(hessian_of(correlated_inputs(64, 8, seed=0))).mean().item())


def test_hopeless_hessian_falls_back_to_rtn() -> None:
    W = torch.randn(6, 8)
    res = gptq_quantize(W, indefinite_hessian(1e7))
    assert res.fallback and math.isnan(res.loss)
    torch.testing.assert_close(res.Q, fake_quant_weight(W, 8))
    assert res.qweight.dtype == torch.int8
    nan_h = torch.full((8, 8), float("nan"))
    assert gptq_quantize(W, nan_h).fallback


def test_actorder_permutation_is_undone() -> None:
    # With a diagonal H no error propagates between columns, so GPTQ must equal RTN column for
    # column in the original order, whatever order it quantized them in.
    k = 20
    H = torch.diag(torch.linspace(0.5, 20.0, k).flip(0)[torch.randperm(k, generator=torch.Generator().manual_seed(0))])
    W = torch.randn(10, k)
    res = gptq_quantize(W, H, actorder=True)
    torch.testing.assert_close(res.Q, fake_quant_weight(W, 8))
    assert torch.equal(res.qweight, quantize_weight(W, weight_scales(W)))


def test_gptq_rejects_bad_arguments() -> None:
    with pytest.raises(HaqError, match="H"):
        gptq_quantize(torch.randn(4, 8), torch.eye(7))
    with pytest.raises(HaqError, match="blocksize"):
        gptq_quantize(torch.randn(4, 8), torch.eye(8), blocksize=0)
    with pytest.raises(HaqError, match="scale"):
        gptq_quantize(torch.randn(4, 8), torch.eye(8), scale=torch.ones(3))


# ---------------------------------------------------------------------------------------- smoothing


def test_smooth_scales_formula_dead_channels_and_clamp() -> None:
    act = torch.tensor([4.0, 100.0, 0.0, 1.0, 1e-12])
    wmax = torch.tensor([1.0, 0.25, 2.0, 0.0, 1.0])
    s = smooth_scales(act, wmax, 0.5)
    # s_j = max|X_j|^alpha / max|W_j|^(1-alpha)
    assert s[0].item() == pytest.approx(4.0**0.5 / 1.0**0.5)
    assert s[1].item() == pytest.approx(100.0**0.5 / 0.25**0.5)
    assert s[2].item() == 1.0 and s[3].item() == 1.0  # dead activation / dead weight channel
    assert s[4].item() == pytest.approx(1e-5)  # clamped
    assert torch.equal(smooth_scales(act[:2], wmax[:2], 1.0), act[:2])
    torch.testing.assert_close(smooth_scales(act[:2], wmax[:2], 0.0), 1 / wmax[:2])
    with pytest.raises(HaqError, match="alpha"):
        smooth_scales(act, wmax, 1.5)


def test_smoothing_is_exact_for_every_consumer() -> None:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(32, 16, dtype=torch.float64, generator=g) * torch.logspace(0, 2, 16, dtype=torch.float64)
    Ws = [torch.randn(n, 16, dtype=torch.float64, generator=g) for n in (8, 4, 12)]  # e.g. q, k, v
    wmax = weight_max_over(Ws)
    torch.testing.assert_close(wmax, torch.cat(Ws).abs().amax(0).float())
    s = smooth_scales(X.abs().amax(0), wmax, 0.5).double()
    for W in Ws:
        torch.testing.assert_close((X / s) @ scale_weight_columns(W, s).T, X @ W.T)
    # smoothing flattens the activation range
    assert (X / s).abs().amax(0).max() / (X / s).abs().amax(0).min() < X.abs().amax(0).max() / X.abs().amax(0).min()


def test_divide_producer_norm_and_linear() -> None:
    g = torch.Generator().manual_seed(1)
    s = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    x = torch.randn(5, 6, dtype=torch.float64, generator=g)
    gamma, beta = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    g2, b2 = divide_producer(gamma, s, beta)  # LayerNorm-style producer
    torch.testing.assert_close(x * g2 + b2, (x * gamma + beta) / s)
    Wp, bp = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)  # e.g. v -> o
    z = torch.randn(5, 3, dtype=torch.float64)
    Wp2, bp2 = divide_producer(Wp, s, bp)
    torch.testing.assert_close(z @ Wp2.T + bp2, (z @ Wp.T + bp) / s)
    assert divide_producer(gamma, s)[1] is None


def test_alpha_grid_and_best_alpha() -> None:
    grid = alpha_grid()
    assert len(grid) == 22 and grid[0] is None and grid[1] == 0.0 and grid[-1] == 1.0
    assert grid[2] == 0.05 and grid[11] == 0.5
    assert alpha_grid(0.25) == [None, 0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(HaqError, match="step"):
        alpha_grid(0.3)

    best, scores = best_alpha(lambda a: abs((a or 0.0) - 0.6), grid)
    assert best == 0.6 and len(scores) == 22 and scores[None] == pytest.approx(0.6)
    best, _ = best_alpha(lambda a: 1.0, grid)  # ties -> first candidate
    assert best is None
    best, _ = best_alpha(lambda a: float("nan") if a == 0.5 else 1.0 + (a or 0), [0.5, 0.25, None])
    assert best is None  # NaN never wins
    with pytest.raises(HaqError, match="NaN"):
        best_alpha(lambda a: float("nan"), [0.1, 0.2])


@pytest.mark.parametrize("target", [0.0, 0.15, 0.35, 0.6, 0.85, 0.95, 1.0])
def test_coarse_to_fine_alpha_finds_the_grid_minimum_of_a_unimodal_score(target: float) -> None:
    def score(a: float | None) -> float:
        return 0.5 if a is None else (a - target) ** 2 + 0.01

    exhaustive, all_scores = best_alpha(score, alpha_grid(0.05))
    best, scores = coarse_to_fine_alpha(score, 0.05)
    assert best == exhaustive == pytest.approx(target)
    assert len(scores) <= 11 < len(all_scores)
    assert all(scores[a] == all_scores[a] for a in scores)  # only real grid points were scored


def test_coarse_to_fine_alpha_small_grid_is_exhaustive_and_keeps_none() -> None:
    best, scores = coarse_to_fine_alpha(lambda a: 0.0 if a is None else 1.0, 0.25)
    assert best is None and list(scores) == alpha_grid(0.25)
    with pytest.raises(HaqError, match="NaN"):
        coarse_to_fine_alpha(lambda a: float("nan"), 0.05)


@pytest.mark.parametrize("target", [0.0, 0.35, 0.6, 1.0])
def test_proxy_pruned_alpha_scores_only_the_proxys_best_and_none(target: float) -> None:
    scored = []

    def score(a: float | None) -> float:
        scored.append(a)
        return 0.5 if a is None else (a - target) ** 2 + 0.01

    proxy = lambda a: 1.0 if a is None else abs(a - target - 0.05)  # noqa: E731  a proxy slightly off
    best, scores = proxy_pruned_alpha(score, proxy, 0.05, keep=3)
    assert scored[0] is None and len(scored) == 4 and set(scores) == set(scored)
    assert best == pytest.approx(target)  # the decisive score corrects the proxy's offset
    best, _ = proxy_pruned_alpha(lambda a: 0.0 if a is None else 1.0, proxy, 0.05, keep=1)
    assert best is None  # no smoothing is always a decisive candidate
    with pytest.raises(HaqError, match="at least one"):
        proxy_pruned_alpha(score, proxy, 0.05, keep=0)


def test_shrunk_expert_hessians_commute_with_each_experts_smoothing():
    """Shrinking toward the pool, then smoothing expert e by s_e, is smoothing then shrinking: the
    pool is taken over unsmoothed inputs, so each shrunk H is the Hessian of the inputs it will see."""
    from haq.quant.observers import InputStats, shrunk_hessian

    gen = torch.Generator().manual_seed(0)
    raw, smoothed, scales = [], [], []
    for e, n in enumerate([5, 40, 300]):
        x = torch.randn(n, 6, generator=gen) * (e + 1)
        a, b = InputStats(f"e{e}"), InputStats(f"e{e}")
        a.update(x)
        b.update(x)
        s = torch.rand(6, generator=gen) + 0.5
        b.smoothed(s)
        raw.append(a), smoothed.append(b), scales.append(s)
    plain, shrunk = shrunk_hessian(raw, 12.0), shrunk_hessian(smoothed, 12.0)
    for e, s in enumerate(scales):
        inv = 1.0 / s
        torch.testing.assert_close(shrunk(e), plain(e) * inv[:, None] * inv[None, :])
    pool = sum(st.H * st.tokens for st in raw) / sum(st.tokens for st in raw)
    torch.testing.assert_close(plain(0), (5 * raw[0].H + 12 * pool) / 17)
    assert shrunk_hessian(raw, 0.0)(1) is raw[1].H  # no prior: the routed Hessian itself


@pytest.mark.parametrize("d", [3, 256, 257, 700])
def test_upper_factor_of_the_inverse_hessian_is_the_reference_one(d):
    """One factorization of the reversed H and a triangular inverse give the upper Cholesky factor
    of (H + damp I)^-1 that factor-invert-factor gives (GPTQ's reference), to float32 rounding."""
    from haq.quant.gptq import _hinv_cholesky, lower_triangular_inverse

    gen = torch.Generator().manual_seed(d)
    X = torch.randn(2 * d, d, generator=gen, dtype=torch.float64) * torch.rand(d, generator=gen, dtype=torch.float64)
    H = (X.t() @ X / (2 * d)).float()
    U, damp = _hinv_cholesky(H, 0.01)
    damped = (H + damp * torch.eye(d)).double()
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    torch.testing.assert_close(U.double(), reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))
    L = torch.linalg.cholesky(damped)
    torch.testing.assert_close(lower_triangular_inverse(L) @ L, torch.eye(d, dtype=torch.float64))
