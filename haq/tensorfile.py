"""A safetensors file written tensor by tensor, from memory and from other safetensors files,
so an offloaded quantization assembles its checkpoint holding one tensor at a time, not the model.
The layout is the format's own (an 8-byte little-endian header length, a JSON header with dtype,
shape and byte offsets per tensor, then the bytes), tensors ordered as safetensors orders them
(largest dtype first, then by name) so every tensor stays aligned."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO

import torch

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
SIZES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def save_streamed(path: Path, tensors: dict[str, torch.Tensor], parts: list[tuple[str, Path]],
                  metadata: dict[str, str]) -> None:
    """Write `tensors` plus every tensor of each safetensors file in `parts` (its keys prefixed)."""
    with open(path, "wb") as out:
        write_safetensors(out, tensors, parts, metadata)


def write_safetensors(out: BinaryIO, tensors: dict[str, torch.Tensor], parts: list[tuple[str, Path]] = (),
                      metadata: dict[str, str] | None = None) -> None:
    """The file's bytes into `out`, one tensor at a time."""
    from safetensors import safe_open

    handles = [(prefix, safe_open(file, "pt")) for prefix, file in parts]
    entries: dict[str, tuple[str, list[int], object]] = {}
    for name, tensor in tensors.items():
        entries[name] = (DTYPES[tensor.dtype], list(tensor.shape), tensor)
    for prefix, handle in handles:
        for key in handle.keys():
            piece = handle.get_slice(key)
            entries[prefix + key] = (piece.get_dtype(), list(piece.get_shape()), (handle, key))
    order = sorted(entries, key=lambda k: (-SIZES[entries[k][0]], k))
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        dtype, shape, _ = entries[name]
        size = SIZES[dtype] * _numel(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    out.write(struct.pack("<Q", len(blob)))
    out.write(blob)
    for name in order:
        source = entries[name][2]
        tensor = source if isinstance(source, torch.Tensor) else source[0].get_tensor(source[1])
        out.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
