"""A KV cache layer with room to grow: transformers' DynamicLayer concatenates every new token onto
the whole cache (a copy of all keys and values, per layer, per step: O(length) work each step).
This one writes each step's keys and values into a preallocated buffer and hands out views;
the buffer grows by doubling, so appending is amortised O(1). Whole-cache edits (the batch
generator's joins and drops assign `keys` / `values`) copy into a fresh buffer with headroom.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

HEADROOM = 64
"""Columns allocated beyond what an assignment or the first update needs."""


class PreallocatedLayer(DynamicLayer):
    """Drop-in for DynamicLayer (same update, mask sizes, crop and batch selection). Keys and
    values have a buffer each: they are assigned one after the other."""

    def __init__(self, capacity: int = 0, **kwargs) -> None:
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._lengths = [0, 0]
        self._empty: list[torch.Tensor | None] = [None, None]  # what an empty layer reads as
        self._capacity_hint = capacity
        super().__init__(**kwargs)

    def _view(self, which: int) -> torch.Tensor | None:
        buf = self._buffers[which]
        return self._empty[which] if buf is None else buf[..., :self._lengths[which], :]

    @property
    def keys(self) -> torch.Tensor | None:
        return self._view(0)

    @keys.setter
    def keys(self, t: torch.Tensor | None) -> None:
        self._assign(0, t)

    @property
    def values(self) -> torch.Tensor | None:
        return self._view(1)

    @values.setter
    def values(self, t: torch.Tensor | None) -> None:
        self._assign(1, t)

    def _assign(self, which: int, t: torch.Tensor | None) -> None:
        """keys or values replaced whole (initialization, joins, drops, crops): a fresh buffer (t may
        be a view of the old one)."""
        if t is None or t.dim() != 4:  # the placeholders of an empty layer
            self._buffers[which], self._empty[which], self._lengths[which] = None, t, 0
            return
        length = t.shape[-2]
        buf = self._allocate(t, max(length + HEADROOM, self._capacity_hint))
        buf[..., :length, :].copy_(t)
        self._buffers[which], self._lengths[which] = buf, length

    @staticmethod
    def _allocate(like: torch.Tensor, columns: int) -> torch.Tensor:
        return torch.zeros((*like.shape[:2], columns, like.shape[-1]), dtype=like.dtype, device=like.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        for which, new in enumerate((key_states, value_states)):
            if self._buffers[which] is None:  # the first columns
                self._buffers[which] = self._allocate(new, max(n + HEADROOM, self._capacity_hint))
                self._lengths[which] = 0
        keys, values, length = self.reserve(n)
        keys[..., length:length + n, :].copy_(key_states)
        values[..., length:length + n, :].copy_(value_states)
        self.advance(n)
        return self.keys, self.values

    def reserve(self, n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(keys buffer, values buffer, length) with room for `n` more columns, for a kernel that
        writes them itself; `advance(n)` then counts them in."""
        length = self._lengths[0]
        for which in (0, 1):
            buf = self._buffers[which]
            if length + n > buf.shape[-2]:  # double: amortised O(1) per appended column
                grown = self._allocate(buf, max(2 * buf.shape[-2], length + n + HEADROOM))
                grown[..., :length, :].copy_(buf[..., :length, :])
                self._buffers[which] = grown
        return self._buffers[0], self._buffers[1], length

    def holds(self, dtype: torch.dtype, device: str) -> bool:
        """Keys and values of `dtype` on `device`, at least one column cached (a cheap check per step)."""
        buf = self._buffers[0]
        return (buf is not None and self._lengths[0] > 0 and buf.dtype == dtype and buf.device.type == device
                and self._buffers[1] is not None)

    def advance(self, n: int) -> None:
        self._lengths = [self._lengths[0] + n, self._lengths[1] + n]


def preallocated(cache, capacity: int = 0):
    """`cache` (a DynamicCache) with its full-attention layers replaced by preallocated ones
    holding `capacity` columns from the start (sliding-window or other layers are kept)."""
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
