"""Int8 GEMM backends, chosen by name: each turns an int8 weight into what it multiplies fastest
(`prepare`) and multiplies int8 activations by it exactly (`matmul`, float32 out, exact integers
up to 2^24). Dense linears and experts both call them through `haq.kernels.int8.int8_linear`;
the name is part of every int8 module's checkpoint spec.

  float    the int32 accumulator computed exactly with float32 GEMMs (any device, any shape)
  int_mm   torch._int_mm (CPU: any shape, fast with VNNI/AMX only; CUDA: K, N multiples of 8)
  fbgemm   FBGEMM's packed u8 x s8 GEMM with exact activation splitting (x86 CPU builds)
  auto     per call, the fastest exact one for the device, instruction set and shape

A new backend is one module in this package that defines a class decorated with
`@register("name")`, plus its name in the tests' backend parameter (tests/test_kernels.py). An
exact int8 GEMM subclasses `GemmBackend` and writes `prepare` and `matmul`; a fused kernel
(quantize, GEMM and rescale in one) overrides `linear` too.
"""
from __future__ import annotations

import importlib
import pkgutil
import weakref
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from haq.errors import HaqError
from haq.kernels.grid import ActMode, quantize_act


class Int8Backend(Protocol):
    name: str
    packs: bool  # whether `prepare` builds something worth caching per weight (else it returns b)

    def available(self, device: torch.device) -> bool:
        """Whether this backend can run on `device` in this PyTorch build."""
        ...

    def prepare(self, b: torch.Tensor) -> Any:
        """The weight b [K, N] int8 (a transposed [N, K] view) in this backend's layout."""
        ...

    def matmul(self, a: torch.Tensor, packed: Any, b: torch.Tensor) -> torch.Tensor:
        """Exact a [M, K] int8 @ b [K, N] int8 as float32 [M, N]; `packed` is `prepare(b)`."""
        ...

    def linear(self, x: torch.Tensor, packed: Any, b: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, act: ActQuant) -> torch.Tensor:
        """x [M, K] float -> float32 [M, N]: x quantized as `act` says, times the int8 weight b
        [K, N] with per-output-channel scales w_scale [N], plus bias."""
        ...


@dataclass(frozen=True)
class ActQuant:
    """How a linear quantizes its input: bits, per-token (dynamic) or per-tensor (static scale, or dynamic)."""

    bits: int = 8
    mode: ActMode = "per-token"
    static_scale: torch.Tensor | float | None = None


class GemmBackend:
    """An exact int8 GEMM: the input quantized once, ``y = (xq @ wq) * x_scale * w_scale + b``."""

    packs = False

    def linear(self, x: torch.Tensor, packed: Any, b: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, act: ActQuant) -> torch.Tensor:
        xq, x_scale = quantize_act(x, act.bits, act.mode, act.static_scale)  # x_scale [M, 1] or scalar
        y = self.matmul(xq, packed, b) * x_scale * w_scale.float().reshape(1, -1)  # exact int32 acc, rescaled
        return y if bias is None else y + bias.float()


_REGISTRY: dict[str, Int8Backend] = {}


def register(name: str):
    """Class decorator: one instance of the class serves every call under `name`."""
    def wrap(cls):
        backend = cls()
        backend.name = name
        _REGISTRY[name] = backend
        return cls

    return wrap


def _load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def backend_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_backend(name: str) -> Int8Backend:
    if name not in _REGISTRY:
        _load_all()
    if name not in _REGISTRY:
        raise HaqError(f"unknown int8 backend {name!r}; choose from {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


_prepared: dict[int, tuple[weakref.ref, dict]] = {}
"""Prepared weights by id of the tensor that owns the int8 storage (tensors compare by value, so
no WeakKeyDictionary), then by backend, view (offset, shape, strides) and the owner's version:
packing costs about one GEMM, so it is done once per weight; an entry goes when its weight is
freed or rewritten."""


def prepared(backend: Int8Backend, b: torch.Tensor) -> Any:
    """`backend.prepare(b)`, cached per weight for backends that pack."""
    if not backend.packs:
        return b
    owner = b._base if b._base is not None else b
    key = (backend.name, b.storage_offset(), tuple(b.shape), b.stride(), owner._version)
    entry = _prepared.get(id(owner))
    if entry is None or entry[0]() is not owner:
        entry = (weakref.ref(owner, lambda _ref, i=id(owner): _prepared.pop(i, None)), {})
        _prepared[id(owner)] = entry
    views = entry[1]
    if key not in views:
        for stale in [k for k in views if k[:4] == key[:4]]:
            del views[stale]
        views[key] = backend.prepare(b)
    return views[key]
