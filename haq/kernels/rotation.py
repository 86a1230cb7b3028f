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


def _kron_sizes(n: int) -> tuple[int, int]:
    """(a, b), a * b = n, a the largest power of two with a^2 <= n that divides n."""
    a = 1
    while n % (2 * a) == 0 and (2 * a) ** 2 <= n:
        a *= 2
    return a, n // a


class OnlineRotation(nn.Module):
    """x -> x (A kron B) over the last dimension: A a randomized Hadamard [a, a], B [b, b]."""

    def __init__(self, a: int, b: int):
        super().__init__()
        self.register_buffer("A", torch.eye(a))
        self.register_buffer("B", torch.eye(b))

    @classmethod
    def seeded(cls, n: int, seed: int = 0) -> OnlineRotation:
        a, b = _kron_sizes(n)
        module = cls(a, b)
        module.A.copy_(rotation_matrix(a, seed))
        module.B.copy_(rotation_matrix(b, seed + 1))
        return module

    @property
    def sizes(self) -> tuple[int, int]:
        return self.A.shape[0], self.B.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.sizes
        y = x.reshape(-1, a, b) @ self.B.to(x.dtype)  # rows: sum_j x_ij B_jl
        y = (y.transpose(1, 2) @ self.A.to(x.dtype)).transpose(1, 2)  # sum_i A_ik y_il
        return y.reshape(x.shape)


