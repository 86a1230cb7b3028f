"""Synthetic Mixtral-scale routing traces and the real Mixtral-8x7B routing statistics behind them.

Why synthetic: a real Mixtral-8x7B trace needs a 90 GB model; the simulator needs traces at that
scale anyway. What is real here: the per-layer expert popularity (Fiddler's MMLU counts for
Mixtral-8x7B, `data/mixtral_expert_popularity/`, Apache-2.0), which the generator matches layer by
layer. What is assumed: the temporal and cross-layer structure, which those counts do not hold.
It comes from a Gaussian score model with two knobs:

  z[t, l] = sqrt(lam) * A_l h_t + sqrt(1 - lam) * u[t, l]        (unit variance per expert)
  h_t = rho h_{t-1} + sqrt(1 - rho^2) xi_t,  u likewise             (AR(1) over a sequence)
  experts[t, l] = top_k(b_l + z[t, l])

h [D] is a latent shared by all layers (cross-layer paths, `layer_locality` = lam), u [L, E] is
per-layer noise, A_l [E, D] a fixed random map with unit-norm rows, and `token_locality` = rho
makes consecutive tokens pick similar experts. The offsets b_l are solved so that each layer's
marginal expert frequencies equal the target popularity (sharpened or flattened by `skew`).
The default rho = 0.15 makes consecutive tokens' top-2 sets share an expert in about 56% of
(token, layer) pairs (first choice repeated in about 18%), within what the Mixtral paper reports
for consecutive tokens (arXiv 2401.04088, Sec. 5, approximately: 0.46-0.62 shared, 0.14-0.28
first choice, by layer; random top-2 of 8 gives 0.46 and 0.125). It says nothing of reuse over
longer spans, which the paper does not measure: AR(1) locality fades within a few tokens. The
default lam = 0.5 is an assumption, not a measurement.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources

import numpy as np

from haq.errors import HaqError
from haq.runtime.trace import Trace, TraceMeta

# Mixtral-8x7B shape: 32 MoE layers, 8 experts, top-2; expert = w1, w3 [14336, 4096] and w2 [4096, 14336].
MIXTRAL_LAYERS = 32
MIXTRAL_EXPERTS = 8
MIXTRAL_TOP_K = 2
MIXTRAL_HIDDEN = 4096
MIXTRAL_FFN = 14336
MIXTRAL_EXPERT_PARAMS = 3 * MIXTRAL_HIDDEN * MIXTRAL_FFN  # 176,160,768
# int8 weights + one fp32 scale per output channel (2 x 14336 + 4096): 168.1 MiB
MIXTRAL_EXPERT_BYTES = MIXTRAL_EXPERT_PARAMS + 4 * (2 * MIXTRAL_FFN + MIXTRAL_HIDDEN)
MIXTRAL_EXPERT_FLOPS = 2 * MIXTRAL_EXPERT_PARAMS  # per routed token: one multiply-add per weight
# int8 attention projections per layer (q, o: 4096x4096; k, v: 1024x4096 with 8 KV heads)
MIXTRAL_NONEXPERT_BYTES_PER_LAYER = 2 * 4096 * 4096 + 2 * 1024 * 4096

DEFAULT_TOKEN_LOCALITY = 0.15
DEFAULT_LAYER_LOCALITY = 0.5
_DATA = "data/mixtral_expert_popularity"
_VARIANTS = ("original", "instruct")


def _data_file(rel: str):
    return resources.files("haq.runtime").joinpath(f"{_DATA}/{rel}")


def load_mixtral_popularity(variant: str = "original", subjects: Sequence[str] | None = None) -> np.ndarray:
    """Real Mixtral-8x7B routing counts [32 layers, 8 experts], summed over MMLU subjects.

    Each count is the number of (token, top-2 slot) selections of that expert, so a layer's row sums
    to 2 x tokens. `subjects` picks files by subject name (e.g. "machine_learning"); default: all.
    """
    if variant not in _VARIANTS:
        raise HaqError(f"unknown Mixtral popularity variant {variant!r}; choose from {list(_VARIANTS)}")
    folder = _data_file(f"mixtral_8x7b_{variant}")
    files = sorted(f for f in folder.iterdir() if f.name.startswith("expert_popularity_"))
    available = {f.name.removeprefix("expert_popularity_").removesuffix(".json"): f for f in files}
    chosen = list(available) if subjects is None else list(subjects)
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise HaqError(f"unknown MMLU subject(s) {unknown}; available: {sorted(available)}")
    total = np.zeros((MIXTRAL_LAYERS, MIXTRAL_EXPERTS))
    for name in chosen:
        total += np.asarray(json.loads(available[name].read_text())["expert_popularity"], dtype=np.float64)
    return total


def load_fiddler_ranking() -> list[tuple[int, int]]:
    """Fiddler's ranked (layer, expert) list for Mixtral-8x7B, most popular first (all 256 pairs).

    Fiddler places the first n of these on the GPU; its profiling text is not stated in its source.
    """
    data = json.loads(_data_file("ranked_list.json").read_text())
    return [(int(layer), int(expert)) for layer, expert in data["popular_experts_ordered"]]


def _per_layer(value: float | Sequence[float], layers: int, name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(layers, float(arr))
    if arr.shape != (layers,):
        raise HaqError(f"{name} must be a number or one value per layer ({layers}), got shape {arr.shape}")
    return arr


def target_inclusion(popularity: np.ndarray, skew: float | Sequence[float], top_k: int) -> np.ndarray:
    """P(expert e is among a token's top-k) per layer [L, E]: popularity ** skew, rescaled to sum k.

    skew 1 keeps the measured popularity, 0 makes routing uniform, > 1 sharpens it. An expert can be
    chosen at most once per token, so probabilities are capped at 1 (the excess is spread over the rest).
    """
    L, E = popularity.shape
    if top_k > E:
        raise HaqError(f"top_k {top_k} exceeds the number of experts {E}")
    if (popularity <= 0).any():
        raise HaqError("popularity counts must be positive (every expert routed at least once)")
    skew_l = _per_layer(skew, L, "skew")
    share = popularity ** skew_l[:, None]
    share /= share.sum(axis=1, keepdims=True)
    q = top_k * share
    for _ in range(E):  # water-filling: cap at 1, rescale the uncapped experts
        over = q > 1.0
        if not over.any():
            break
        q = np.where(over, 1.0, q)
        free = np.where(over, 0.0, q)
        need = top_k - over.sum(axis=1, keepdims=True)
        q = np.where(over, 1.0, free * need / np.maximum(free.sum(axis=1, keepdims=True), 1e-12))
    return q


def _mixing(layers: int, experts: int, latent_dim: int, rng: np.random.Generator) -> np.ndarray:
    A = rng.standard_normal((layers, experts, latent_dim))  # [L, E, D]
    return A / np.linalg.norm(A, axis=2, keepdims=True)


def _noise(h: np.ndarray, u: np.ndarray, A: np.ndarray, lam: float) -> np.ndarray:
    # h [N, D], u [N, L, E], A [L, E, D] -> z [N, L, E] with unit variance per entry
    return np.sqrt(lam) * np.einsum("led,nd->nle", A, h) + np.sqrt(1.0 - lam) * u


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


def _inclusion(scores: np.ndarray, k: int) -> np.ndarray:
    """[..., E] bool: in the top k (ties have probability zero with continuous noise)."""
    E = scores.shape[-1]
    return scores >= np.partition(scores, E - k, axis=-1)[..., E - k:E - k + 1]


def calibrate_offsets(q_target: np.ndarray, A: np.ndarray, lam: float, top_k: int,
                      rng: np.random.Generator, samples: int = 4000, iters: int = 20) -> np.ndarray:
    """Offsets b [L, E] such that top_k(b_l + z) hits each expert with probability q_target[l, e].

    Fixed-point iteration b += log(q_target / q_hat) on one fixed noise sample (common random
    numbers, so the iteration is smooth); the stationary marginal of z does not depend on rho.
    """
    L, E, D = A.shape
    z = _noise(rng.standard_normal((samples, D)), rng.standard_normal((samples, L, E)), A, lam)
    b = np.log(q_target)
    for _ in range(iters):
        q_hat = _inclusion(b + z, top_k).mean(axis=0)
        b += 0.8 * (np.log(q_target) - np.log(np.maximum(q_hat, 0.5 / samples)))
        b -= b.mean(axis=1, keepdims=True)
    return b


def generate_synthetic_trace(
    num_sequences: int = 8,
    seq_len: int = 256,
    *,
    popularity: np.ndarray | None = None,
    top_k: int = MIXTRAL_TOP_K,
    skew: float | Sequence[float] = 1.0,
    token_locality: float = DEFAULT_TOKEN_LOCALITY,
    layer_locality: float = DEFAULT_LAYER_LOCALITY,
    latent_dim: int = 8,
    seed: int = 0,
    model: str = "mixtral-8x7b",
) -> Trace:
    """A routing trace shaped like `popularity` [L, E] (default: real Mixtral-8x7B, 32 x 8, top-2).

    `skew` (scalar or per layer) sharpens or flattens each layer's popularity; `token_locality`
    (rho in [0, 1)) ties consecutive tokens; `layer_locality` (lam in [0, 1]) ties layers of a token.
    """
    if not 0.0 <= token_locality < 1.0:
        raise HaqError(f"token_locality must be in [0, 1), got {token_locality}")
    if not 0.0 <= layer_locality <= 1.0:
        raise HaqError(f"layer_locality must be in [0, 1], got {layer_locality}")
    if num_sequences < 1 or seq_len < 1:
        raise HaqError(f"need at least one sequence of one token, got {num_sequences} x {seq_len}")
    pop = load_mixtral_popularity() if popularity is None else np.asarray(popularity, dtype=np.float64)
    L, E = pop.shape
    rng = np.random.default_rng(seed)
    A = _mixing(L, E, latent_dim, rng)
    q = target_inclusion(pop, skew, top_k)
    b = calibrate_offsets(q, A, layer_locality, top_k, rng)

    rho = token_locality
    S, T = num_sequences, seq_len
    experts = np.empty((S, T, L, top_k), dtype=np.int16)
    weights = np.empty((S, T, L, top_k), dtype=np.float16)
    h = rng.standard_normal((S, latent_dim))
    u = rng.standard_normal((S, L, E))
    step = np.sqrt(1.0 - rho * rho)
    for t in range(T):
        if t:
            h = rho * h + step * rng.standard_normal(h.shape)
            u = rho * u + step * rng.standard_normal(u.shape)
        scores = b + _noise(h, u, A, layer_locality)  # [S, L, E]
        top = _topk(scores, top_k)  # [S, L, K]
        s = np.take_along_axis(scores, top, axis=2)
        w = np.exp(s - s.max(axis=2, keepdims=True))
        experts[:, t] = top
        weights[:, t] = w / w.sum(axis=2, keepdims=True)

    params = {"skew": np.asarray(skew).tolist(), "token_locality": token_locality,
              "layer_locality": layer_locality, "latent_dim": latent_dim, "seed": seed,
              "popularity": "mixtral-8x7b original MMLU (Fiddler)" if popularity is None else "user"}
    meta = TraceMeta(
        model=model, num_experts=E, layers=L, top_k=top_k,
        source=f"synthetic (not a model run): {json.dumps(params, sort_keys=True)}",
        extra={"synthetic": params},
    )
    return Trace(
        experts=experts.reshape(S * T, L, top_k),
        seq_id=np.repeat(np.arange(S, dtype=np.int32), T),
        pos=np.tile(np.arange(T, dtype=np.int32), S),
        meta=meta,
        weights=weights.reshape(S * T, L, top_k),
    )
