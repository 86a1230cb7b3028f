"""The timeline of `haq.sim.timeline.run_policy` in C (`replay.c`) for per-layer LRU and Fiddler,
whose decisions need nothing from Python: a replay of tens of millions of expert calls is a
Python loop of tens of minutes per policy, and these two are the baselines every budget and
trace replays. The C loop does the same float operations in the same order, so its counters and
latencies are the Python loop's bit for bit (tests/test_sim_native.py); haq and any replay with
a lookahead stay in Python. No compiler: `library()` is None and the Python loop runs.
"""
from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from haq.kernels import cpu
from haq.runtime.policies import Fiddler, PerLayerLru, Policy

SOURCE = Path(__file__).with_name("replay.c")
FLAGS = ["-O2", "-shared", "-fPIC", "-ffp-contract=off"]  # no FMA contraction: Python's rounding, step by step
LRU, FIDDLER = 0, 1
_p, _i64, _i32, _f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_double


class ReplayIn(ctypes.Structure):
    _fields_ = [("steps", _i64), ("layers", _i64), ("experts", _i64), ("offsets", _p), ("expert", _p),
                ("tokens", _p), ("ne", _p), ("t_cpu", _p), ("t_dev", _p), ("t_copy", _f64),
                ("act_roundtrip", _f64), ("nbytes", _f64), ("cpu_bw", _f64), ("shared_bw", _f64),
                ("device_is_host", _i32), ("policy", _i32), ("slots", _i64), ("pinned", _p),
                ("cpu_per_token", _f64), ("copy_and_run", _f64), ("expert_bytes", _i64),
                ("initial_resident_bytes", _i64)]


class ReplayOut(ctypes.Structure):
    _fields_ = [("hits", _p), ("calls", _p), ("step_latency", _p), ("step_hits", _p), ("step_calls", _p),
                ("cpu_calls", _i64), ("copies", _i64), ("staged", _i64), ("peak_resident_bytes", _i64)]


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    target = cpu.built(SOURCE, FLAGS)
    if target is None:
        return None
    lib = ctypes.CDLL(str(target))
    lib.haq_replay.argtypes = [ctypes.POINTER(ReplayIn), ctypes.POINTER(ReplayOut)]
    lib.haq_replay.restype = ctypes.c_int
    return lib


def runs(policy: Policy) -> bool:
    """Whether the C loop can replay `policy`: an unused per-layer LRU, or Fiddler (any ranking)."""
    if isinstance(policy, PerLayerLru):
        return policy.cache.used_bytes == 0 and library() is not None
    return isinstance(policy, Fiddler) and library() is not None


def replay(policy: Policy, steps: Sequence, predictor, layers: int, ne: np.ndarray) -> dict:
    """The counters `run_policy` gathers (its `Replay` fields, without prefetch ones) for `steps`;
    `ne` [steps]: each step's non-expert seconds per layer."""
    sizes = np.fromiter((len(calls) for st in steps for calls in st.calls), dtype=np.int64, count=len(steps) * layers)
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    pairs = np.fromiter((x for st in steps for calls in st.calls for call in calls for x in call), dtype=np.int32,
                        count=2 * int(offsets[-1])).reshape(-1, 2)
    expert, tokens = np.ascontiguousarray(pairs[:, 0]), np.ascontiguousarray(pairs[:, 1])
    top = int(tokens.max()) if len(tokens) else 1
    t_cpu, t_dev = np.zeros(top + 1), np.zeros(top + 1)
    for n in np.unique(tokens).tolist():
        t_cpu[n], t_dev[n] = predictor.t_cpu(n), predictor.t_device(n)
    times, prof = predictor.times, predictor.times.profile
    keys = sorted(policy.cache.pinned) if isinstance(policy, Fiddler) else []
    experts = 1 + max([int(expert.max()) if len(expert) else 0] + [e for _, e in keys])
    pinned = np.zeros(layers * experts, dtype=np.uint8)
    if keys:
        for layer, e in keys:
            pinned[layer * experts + e] = 1
    ne = np.ascontiguousarray(ne, dtype=np.float64)
    S = len(steps)
    hits, calls = np.zeros(layers), np.zeros(layers)
    latency, step_hits, step_calls = np.zeros(S), np.zeros(S, dtype=np.int64), np.zeros(S, dtype=np.int64)
    is_lru = isinstance(policy, PerLayerLru)
    arg = ReplayIn(
        steps=S, layers=layers, experts=experts, offsets=offsets.ctypes.data, expert=expert.ctypes.data,
        tokens=tokens.ctypes.data, ne=ne.ctypes.data, t_cpu=t_cpu.ctypes.data, t_dev=t_dev.ctypes.data,
        t_copy=predictor.t_transfer(), act_roundtrip=2 * prof.link.latency.value, nbytes=float(times.expert_bytes),
        cpu_bw=prof.cpu.mem_bw.value, shared_bw=times.cpu_bw_while_copying, device_is_host=int(prof.device_is_host),
        policy=LRU if is_lru else FIDDLER, slots=policy.cache.slots if is_lru else 0, pinned=pinned.ctypes.data,
        cpu_per_token=0.0 if is_lru else policy.cpu_per_token, copy_and_run=0.0 if is_lru else policy.copy_and_run,
        expert_bytes=times.expert_bytes, initial_resident_bytes=policy.resident_bytes())
    out = ReplayOut(hits=hits.ctypes.data, calls=calls.ctypes.data, step_latency=latency.ctypes.data,
                    step_hits=step_hits.ctypes.data, step_calls=step_calls.ctypes.data)
    if library().haq_replay(ctypes.byref(arg), ctypes.byref(out)) != 0:
        raise MemoryError("the replay's scratch arrays")
    return {"hits_per_layer": hits, "calls_per_layer": calls, "cpu_calls": out.cpu_calls, "copies": out.copies,
            "staged": bool(out.staged), "peak_resident_bytes": out.peak_resident_bytes, "step_latency": latency,
            "step_hits": step_hits, "step_calls": step_calls}
