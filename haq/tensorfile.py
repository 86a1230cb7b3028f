"""A safetensors file written tensor by tensor, from memory and from other safetensors files,
so an offloaded quantization assembles its checkpoint holding one tensor at a time, not the model.
The layout is the format's own (an 8-byte little-endian header length, a JSON header with dtype,
shape and byte offsets per tensor, then the bytes), the largest dtype first, as safetensors
orders them, so every tensor stays aligned."""
from __future__ import annotations

import json
import math
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
    """The file's bytes into `out`, one tensor at a time. Each part is open only while its tensors
    are copied (a memory-mapped file's pages count as resident while it is open), so within a
    dtype the tensors go part by part."""
    from safetensors import safe_open

    entries: dict[str, tuple[str, list[int], int, object]] = {}  # dtype, shape, part (-1: memory), source
    for name, tensor in tensors.items():
        entries[name] = (DTYPES[tensor.dtype], list(tensor.shape), -1, tensor)
    for part, (prefix, file) in enumerate(parts):
        with safe_open(file, "pt") as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                entries[prefix + key] = (piece.get_dtype(), list(piece.get_shape()), part, key)
    order = sorted(entries, key=lambda k: (-SIZES[entries[k][0]], entries[k][2], k))
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        dtype, shape, _, _ = entries[name]
        size = SIZES[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    out.write(struct.pack("<Q", len(blob)))
    out.write(blob)
    handle, open_part = None, -1
    for name in order:
        _, _, part, source = entries[name]
        if part >= 0 and part != open_part:
            handle, open_part = None, part  # the previous part's file closes with its handle
            handle = safe_open(parts[part][1], "pt")
        tensor = source if part < 0 else handle.get_tensor(source)
        out.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
