"""haq's own CPU int8 kernels (`int8_kernels.c`): built with the system C compiler at first use
(`gcc -O3 -march=native -fopenmp`, about a second), cached under ``HAQ_HOME/kernels`` by a hash
of the source, the compiler and the CPU's flags, and called through ctypes with raw pointers.

Why C and not another torch op: at decode sizes (a few rows) a W8A8 linear is a read of its
int8 weight, tens of microseconds, and the PyTorch path around the GEMM (quantize, split, cat,
rescale: 5-8 small ops) costs as much again; here quantization, the integer product and the
rescale are one pass, and a MoE layer's routed experts are one call. The library links the
OpenMP runtime PyTorch has already loaded (same soname), so both share one thread pool.

No compiler, a failed build or ``HAQ_NATIVE=0``: `library()` is None and the "auto" backend
uses the PyTorch ones (`unavailable_reason()` says why).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from haq.paths import haq_home

SOURCE = Path(__file__).with_name("int8_kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=off"]
_reason: list[str] = []


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "gcc"))


def _build(cc: str, flags: list[str], source: Path, target: Path) -> None:
    """Compile into a temporary file beside `target`, then rename: a concurrent or interrupted
    build never leaves a half-written library under the final name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *flags, str(source), "-o", tmp, "-lm"], check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def built(source: Path, flags: list[str]) -> Path | None:
    """The shared library of one C `source`, compiled at first use and cached under
    ``HAQ_HOME/kernels`` by a hash of the source, the compiler, `flags` and the CPU's flags; None
    (with `unavailable_reason()`) when there is no compiler or the build fails."""
    cc = _compiler()
    if cc is None:
        _reason.append("no C compiler (gcc, or $CC) on PATH")
        return None
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([source.read_text(), version, *flags, _cpu_flags()]).encode()).hexdigest()[:16]
    target = haq_home() / "kernels" / f"{source.stem}-{key}.so"
    if not target.is_file():
        try:
            _build(cc, flags, source, target)
        except (subprocess.CalledProcessError, OSError) as e:
            detail = (getattr(e, "stderr", "") or str(e)).strip()
            _reason.append(f"building {source.name} failed: {detail.splitlines()[-1] if detail else e}")
            return None
    return target


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built first if needed; None when they cannot be (see `unavailable_reason`)."""
    return load()


@functools.lru_cache(maxsize=2)
def load(portable: bool = False) -> ctypes.CDLL | None:
    """The kernels as built for this CPU, or (`portable`, for the tests of the fallback) without
    the VNNI instructions even where the CPU has them."""
    if os.environ.get("HAQ_NATIVE", "1") == "0":
        _reason.append("disabled by HAQ_NATIVE=0")
        return None
    target = built(SOURCE, FLAGS + (["-mno-avx512vnni", "-mno-avxvnni"] if portable else []))
    if target is None:
        return None
    lib = ctypes.CDLL(str(target))
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.haq_row_sums.argtypes = [p, i64, i64, p]
    lib.haq_linear.argtypes = [p, i64, i64, p, p, p, p, i64, i32, i32, f32, p, i32, p]
    lib.haq_moe.argtypes = [p, i64, i64, i64, i64, p, p, p, p, p, p, p, p, p, p, i32, p, p, i32, p]
    lib.haq_moe_scratch.argtypes = [i64, i64, i64, i64]
    lib.haq_moe_scratch.restype = i64
    lib.haq_decode_attention.argtypes = [p, p, p, i64, i64, i64, i64, i64, i64, p, p, p, p, i64, i64, p, f32, p, i32]
    lib.haq_decode_scratch.argtypes = [ctypes.POINTER(Step), i64]
    lib.haq_decode_scratch.restype = i64
    lib.haq_decode_step.argtypes = [ctypes.POINTER(Step), ctypes.POINTER(Layer), p, p, p, p, p]
    lib.haq_gptq_block.argtypes = [p, p, p, i64, i64, f32, p, p]
    lib.haq_fake_quant_rows.argtypes = [p, i64, i64, f32, f32, p]
    for fn in (lib.haq_row_sums, lib.haq_linear, lib.haq_moe, lib.haq_decode_attention, lib.haq_decode_step,
               lib.haq_gptq_block, lib.haq_fake_quant_rows):
        fn.restype = None
    return lib


class QLinear(ctypes.Structure):
    """`haq_qlinear`: an int8 [n, k] weight, its row sums, per-row scales and optional bias; or, in
    a float32 model's step, `wf`, the float32 weight (and the bias)."""
    _fields_ = [("w", ctypes.c_void_p), ("sums", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("wf", ctypes.c_void_p)]


class Rotation(ctypes.Structure):
    """`haq_rotation`: x -> x (A kron B) of a down input, float32 A [na, na], B [nb, nb]; na = 0: none."""
    _fields_ = [("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("na", ctypes.c_int64), ("nb", ctypes.c_int64)]


class Layer(ctypes.Structure):
    """`haq_layer`: one decoder layer's weights and KV buffers for `haq_decode_step`."""
    _fields_ = [("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p), ("qkv", QLinear), ("o", QLinear),
                ("router", ctypes.c_void_p), ("tables", ctypes.c_void_p), ("inter", ctypes.c_int64),
                ("down_rot", Rotation), ("kbuf", ctypes.c_void_p), ("vbuf", ctypes.c_void_p), ("cap", ctypes.c_int64)]


class Step(ctypes.Structure):
    """`haq_step`: the model's shapes and the step's positions for `haq_decode_step`."""
    _fields_ = [(name, ctypes.c_int64) for name in ("layers", "B", "H", "heads", "kv_heads", "head_dim", "experts",
                                                     "top_k", "vocab", "length")] + \
               [("pads", ctypes.c_void_p), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p),
                ("final_norm", ctypes.c_void_p), ("lm_head", ctypes.c_void_p), ("lm_head_q", QLinear),
                ("eps", ctypes.c_float),
                ("attn_scale", ctypes.c_float), ("qmax", ctypes.c_int32), ("threads", ctypes.c_int32)]


def unavailable_reason() -> str:
    return _reason[-1] if _reason else ""


def has_vnni() -> bool:
    lib = library()
    return bool(lib is not None and lib.haq_has_vnni())


_scratch = threading.local()


def scratch(nbytes: int) -> torch.Tensor:
    """A per-thread byte buffer of at least `nbytes`, reused across calls (no allocation per step)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(max(nbytes, 1 << 16), dtype=torch.uint8)
        _scratch.buf = buf
    return buf


def row_sums(w: torch.Tensor) -> torch.Tensor:
    """int32 [N] row sums of a contiguous int8 [N, K] weight (the VNNI offset's compensation)."""
    lib = library()
    sums = torch.empty(w.shape[0], dtype=torch.int32)
    lib.haq_row_sums(w.data_ptr(), w.shape[0], w.shape[1], sums.data_ptr())
    return sums
