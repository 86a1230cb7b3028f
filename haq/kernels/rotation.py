"""Orthogonal rotations as kernels: Hadamard and seeded random orthogonal matrices, and the online
rotation x -> x (A kron B) that int8 linears apply to their inputs before quantizing (n(a+b)
multiply-adds per token instead of n^2). Which inputs are rotated, and the offline rewrite of the
weights, is :mod:`haq.quant.rotation`."""
from __future__ import annotations

import math

import torch
from torch import nn


def hadamard(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of order n (a power of two), orthonormal, float64."""
    if n & (n - 1):
        raise ValueError(f"Sylvester Hadamard needs a power of two, got {n}")
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H / math.sqrt(n)


def rotation_matrix(n: int, seed: int = 0) -> torch.Tensor:
    """A random orthogonal n x n matrix, float64: random signs times H_(2^k) (x) O_m, n = 2^k m.

    A pure randomized Hadamard when n is a power of two (the most even spread of any one channel,
    QuaRot's choice); otherwise the odd factor comes from a seeded random orthogonal O_m (QR).
    """
    gen = torch.Generator().manual_seed(seed)
    k = n & -n  # largest power of two dividing n
    m = n // k
    Q = hadamard(k)
    if m > 1:
        O, R = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
        Q = torch.kron(Q, (O * torch.sign(torch.diagonal(R))).contiguous())
    signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
    return signs[:, None] * Q


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _paley(h: int) -> torch.Tensor | None:
    """A +-1 Hadamard matrix of order h from Paley's constructions over GF(q), q prime: I
    (q = h - 1 = 3 mod 4) or II (q = h / 2 - 1 = 1 mod 4); None when neither applies."""
    def jacobsthal(q: int) -> torch.Tensor:  # Q_ij = chi(j - i), chi the quadratic character mod q
        squares = {(x * x) % q for x in range(1, q)}
        chi = torch.tensor([0] + [1 if r in squares else -1 for r in range(1, q)], dtype=torch.float64)
        idx = torch.arange(q)
        return chi[(idx[None, :] - idx[:, None]) % q]

    q = h - 1
    if _is_prime(q) and q % 4 == 3:  # H = I + [[0, 1], [-1, Q]] (Q antisymmetric)
        S = torch.zeros(h, h, dtype=torch.float64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, jacobsthal(q)
        return torch.eye(h, dtype=torch.float64) + S
    q = h // 2 - 1
    if h % 2 == 0 and _is_prime(q) and q % 4 == 1:  # C = [[0, 1], [1, Q]] (Q symmetric), each entry -> 2x2
        C = torch.zeros(h // 2, h // 2, dtype=torch.float64)
        C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, jacobsthal(q)
        plus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        zero = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(C, plus) + torch.kron(torch.eye(h // 2, dtype=torch.float64), zero)
    return None


def _hadamard_order(n: int) -> int | None:
    """The smallest h = m 2^j dividing n (m the odd part of n) with a Hadamard matrix haq can build
    (Sylvester's for m = 1, Paley's otherwise, up to order 256 so that x R stays cheap); None when
    there is none (e.g. m = 43, whose 172 needs a Williamson construction)."""
    m = n // (n & -n)
    h = m
    while n % h == 0 and h <= 256:
        if m == 1 or _paley(h) is not None:
            return h
        h *= 2
    return None


def hadamard_pm1(n: int) -> torch.Tensor | None:
    """A +-1 Hadamard matrix of order n (H H^T = n I), float64: Paley's of order h kron Sylvester's
    of order n / h (`_hadamard_order`), or None."""
    h = _hadamard_order(n)
    if h is None:
        return None
    return torch.kron(_paley(h) if h > 1 else torch.ones(1, 1, dtype=torch.float64), hadamard(n // h) * math.sqrt(n // h))


def _kron_sizes(n: int, odd: int) -> tuple[int, int]:
    """(a, b), a * b = n, a the largest power of two with a^2 <= n that leaves b a multiple of `odd`."""
    a = 1
    while n % (2 * a) == 0 and (2 * a) ** 2 <= n and (n // (2 * a)) % odd == 0:
        a *= 2
    return a, n // a


def has_hadamard(n: int) -> bool:
    """Whether `OnlineRotation.seeded(n)` is a Hadamard rotation (one that exports)."""
    return _hadamard_order(n) is not None


def _signed(H: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    signs = torch.randint(0, 2, (H.shape[0],), generator=gen).to(torch.float64) * 2 - 1
    return signs[:, None] * H / math.sqrt(H.shape[0])


class OnlineRotation(nn.Module):
    """x -> x (A kron B) over the last dimension: A a randomized Hadamard [a, a], B [b, b]."""

    def __init__(self, a: int, b: int):
        super().__init__()
        self.register_buffer("A", torch.eye(a))
        self.register_buffer("B", torch.eye(b))

    @classmethod
    def seeded(cls, n: int, seed: int = 0) -> OnlineRotation:
        """A randomized Hadamard R = D_a S_a kron D_b H_b / sqrt(n) (D random signs, S Sylvester's,
        H_b Hadamard) where one of order b exists, so R sqrt(n) is +-1 and exports as a
        compressed-tensors Hadamard transform; otherwise B is `rotation_matrix(b)` (orthogonal)."""
        gen = torch.Generator().manual_seed(seed)
        h = _hadamard_order(n)
        a, b = _kron_sizes(n, h if h is not None else n // (n & -n))
        hadamard_b = hadamard_pm1(b) if h is not None else None
        module = cls(a, b)
        module.A.copy_(_signed(hadamard(a) * math.sqrt(a), gen))
        module.B.copy_(_signed(hadamard_b, gen) if hadamard_b is not None else rotation_matrix(b, seed + 1))
        return module

    @property
    def is_hadamard(self) -> bool:
        """Whether sqrt(n) R has entries +-1 (a Hadamard matrix), the form compressed-tensors stores:
        it does exactly when both factors do (sqrt(a) A and sqrt(b) B), checked without forming R."""
        return all(bool(((M.double().abs() * math.sqrt(M.shape[0]) - 1).abs() < 1e-4).all()) for M in (self.A, self.B))

    def matrix(self) -> torch.Tensor:
        """R = A kron B, float64: x -> x R."""
        return torch.kron(self.A.double(), self.B.double())

    @property
    def sizes(self) -> tuple[int, int]:
        return self.A.shape[0], self.B.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.sizes
        y = x.reshape(-1, a, b) @ self.B.to(x)  # rows: sum_j x_ij B_jl (factors on x's device and dtype)
        y = (y.transpose(1, 2) @ self.A.to(x)).transpose(1, 2)  # sum_i A_ik y_il
        return y.reshape(x.shape)


