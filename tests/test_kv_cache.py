"""The preallocated KV layer behaves as transformers' DynamicLayer: same keys and values after any
sequence of appends (through growth), assignments, crops and batch selections; appends do not copy."""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from haq.runtime.kv_cache import HEADROOM, PreallocatedLayer


def same(a: DynamicLayer, b: PreallocatedLayer) -> bool:
    return torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) and \
        a.get_seq_length() == b.get_seq_length() and a.get_mask_sizes(1) == b.get_mask_sizes(1)


def test_appends_assignments_crops_and_selection_match_dynamic_layer() -> None:
    g = torch.Generator().manual_seed(0)
    ref, new = DynamicLayer(), PreallocatedLayer(capacity=5)
    assert new.get_seq_length() == 0 and new.keys is None
    for n in [3, 1, 1, 4, 1, 70, 1, 200]:  # past the first capacity and through doublings
        k, v = torch.randn(2, 3, n, 4, generator=g), torch.randn(2, 3, n, 4, generator=g)
        out_ref, out_new = ref.update(k, v), new.update(k, v)
        assert torch.equal(out_ref[0], out_new[0]) and torch.equal(out_ref[1], out_new[1])
        assert same(ref, new)
    for layer in (ref, new):
        layer.crop(-7)
        layer.batch_select_indices(torch.tensor([1]))
    assert same(ref, new)
    pad = torch.zeros(1, 3, 2, 4)
    for layer in (ref, new):  # what the batch generator does when a row joins: assign whole
        layer.keys = torch.cat([pad, layer.keys], dim=-2)
        layer.values = torch.cat([pad, layer.values], dim=-2)
    assert same(ref, new)
    k = torch.randn(1, 3, 1, 4, generator=g)
    ref.update(k, k)
    new.update(k, k)
    assert same(ref, new)


def test_appending_writes_in_place_until_the_capacity_is_reached() -> None:
    layer = PreallocatedLayer(capacity=100)
    layer.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4))
    capacity = layer._buffers[0].shape[-2]
    assert capacity == max(100, 3 + HEADROOM)
    buffer = layer.keys.untyped_storage().data_ptr()
    for _ in range(capacity - 3):
        layer.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))
    assert layer.keys.untyped_storage().data_ptr() == buffer and layer.get_seq_length() == capacity
    layer.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))  # one past: a doubling
    assert layer.keys.untyped_storage().data_ptr() != buffer and layer._buffers[0].shape[-2] == 2 * capacity
    assert torch.equal(layer.keys, torch.ones(1, 2, capacity + 1, 4))
