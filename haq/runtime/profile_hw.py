"""`haq profile-hw`: measure this machine for one expert shape and write a HardwareProfile.

t(n) = a + b n is fitted (through the measured t(1), medians of repeats) to expert calls with n
tokens on the CPU and on the device, as the engine runs them (on the CPU its grouped kernel where
it has one; a CPU "device" call by call); a / b become the profile's
bytes / mem_bw and flops_per_token / int8_ops (the per-call overhead is folded into a, so it is
recorded as the smallest positive value). Host -> device copies are timed from (pinned) host
memory. Without CUDA the "device" is the CPU itself, and a copy is a host memory copy.
`measure_overhead_s_per_layer` times the rest of a decode step on the engine itself (attention,
router, dispatch): the simulator's non-expert time per layer.
"""
from __future__ import annotations

import platform
import statistics
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from haq.runtime.hardware import HardwareProfile, Link, Processor, Quantity
from haq.runtime.policies import make_policy
from haq.runtime.sampling import SamplingParams
from haq.kernels.moe import ExpertCall
from haq.runtime.store import ExpertMath, ExpertStore, ExpertWeights

if TYPE_CHECKING:
    from haq.runtime.engine import Engine
    from haq.runtime.generation import BatchGenerator

TOKEN_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128)


def _median_time(fn, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fit(ns: list[int], ts: list[float]) -> tuple[float, float]:
    """t(n) = a + b n through the measured t(1), exactly: decode calls (n = 1) are most of a
    generation's calls, and a free least-squares line lets the large-n points pull its intercept
    off the measured single-token time. b is the least-squares slope of t(n) - t(1) over n - 1."""
    n, t = np.array(ns, dtype=float), np.array(ts)
    dn, dt = n[1:] - n[0], t[1:] - t[0]
    b = max(float(dn @ dt / (dn @ dn)), 1e-12)
    a = max(float(t[0] - b * n[0]), 1e-7)
    return a, b


COLD_BYTES = 256 * 2**20
"""Weights cycled through when timing CPU calls: more than any last-level cache, so every call
streams its expert from DRAM as the engine's calls do (one expert timed over and over would sit in
cache and look several times faster than it is in a run)."""


def measure_expert_times(weights: ExpertWeights, math: ExpertMath, device: torch.device,
                         repeats: int = 5, grouped: bool = True) -> tuple[list[int], list[float]]:
    """Seconds of one expert call of n tokens, n in TOKEN_COUNTS, as the engine runs it on `device`.
    On the CPU with `grouped`, calls go through the grouped kernel where the store has one for these
    experts (`ExpertStore.grouped`), as the engine's CPU calls and its one-call decode steps do: the
    kernel alone is timed (its Python around is per layer, not per call, and counted in the
    non-expert time). Without (the CPU as the "device", whose calls go one by one), the expert math
    call by call."""
    copies = 1 if device.type == "cuda" else max(1, min(64, -(-COLD_BYTES // weights.nbytes)))
    ws = [weights.to(device) if i == 0 else weights.to(device).copy() for i in range(copies)]
    hidden = ws[0].gate_up.shape[1]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    kernel = ExpertStore([ws], math).grouped if device.type == "cpu" and grouped else None
    turn = iter(range(10**9))
    times = []
    for n in TOKEN_COUNTS:
        x = torch.randn(n, hidden, device=device)
        if kernel is not None:
            rows, slots, gates = torch.arange(n), torch.zeros(n, dtype=torch.long), torch.ones(n, 1)
            launches = [kernel[0].prepare(x, [ExpertCall(e, rows, slots)], gates, combined=False)[0]
                        for e in range(copies)]
            call = lambda: launches[next(turn) % copies]()  # noqa: E731
        else:
            call = lambda: math.forward(ws[next(turn) % copies], x)  # noqa: E731
        times.append(_median_time(call, max(repeats, copies), sync))
    return list(TOKEN_COUNTS), times


def measure_copy(weights: ExpertWeights, device: torch.device, repeats: int = 5) -> float:
    if device.type == "cuda":
        host = weights.pin()
        return _median_time(lambda: host.to(device, non_blocking=True), repeats,
                            lambda: torch.cuda.synchronize(device))
    return _median_time(weights.copy, repeats)


def profile_hardware(weights: ExpertWeights, math: ExpertMath, device: str = "cpu", repeats: int = 5,
                     name: str | None = None) -> HardwareProfile:
    dev = torch.device(device)
    nbytes = weights.nbytes
    flops = 2.0 * (weights.gate_up.numel() + weights.down.numel())
    where = f"{platform.node()} ({platform.processor() or platform.machine()}, torch {torch.__version__})"
    shape = f"expert {tuple(weights.gate_up.shape)}+{tuple(weights.down.shape)} {weights.gate_up.dtype}"

    def processor(ns, ts, label) -> Processor:
        a, b = _fit(ns, ts)
        src = f"measured: t(n) = a + b n fitted to {label} calls n={ns[0]}..{ns[-1]} ({shape}) on {where}"
        return Processor(mem_bw=Quantity(nbytes / a, "B/s", src + "; bytes / a"),
                         int8_ops=Quantity(flops / b, "op/s", src + "; flops per token / b"),
                         overhead=Quantity(1e-9, "s", "folded into a (bytes / mem_bw)"))

    cpu = processor(*measure_expert_times(weights, math, torch.device("cpu"), repeats), "CPU")
    device_proc = (processor(*measure_expert_times(weights, math, dev, repeats, grouped=False), "CPU, one by one")
                   if dev.type == "cpu" else
                   processor(*measure_expert_times(weights, math, dev, repeats), torch.cuda.get_device_name(dev)))
    copy_s = measure_copy(weights, dev, repeats)
    link_src = f"measured: {nbytes} B expert copied host -> {dev} in {copy_s * 1e6:.0f} us on {where}"
    link = Link(bw=Quantity(nbytes / copy_s, "B/s", link_src), latency=Quantity(1e-9, "s", "folded into bw"))
    host_bw = Quantity(2.2 * link.bw.value if dev.type == "cpu" else max(3 * link.bw.value, cpu.mem_bw.value * 1.1),
                       "B/s", "derived: host copies read and write every byte (about 2x the copy rate)"
                       if dev.type == "cpu" else "derived: at least the CPU's streaming rate plus the link's reads")
    if dev.type == "cuda":
        memory = Quantity(float(torch.cuda.get_device_properties(dev).total_memory), "B",
                          "measured: torch.cuda.get_device_properties")
    else:
        import os

        memory = Quantity(float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), "B",
                          "measured: physical host memory (the device is the CPU)")
    return HardwareProfile(name=name or f"measured-{dev.type}", description=f"measured by haq profile-hw on {where}",
                           cpu=cpu, device=device_proc, link=link, host_memory_bw=host_bw, device_memory=memory,
                           device_is_host=dev.type == "cpu")


@torch.no_grad()
def measure_overhead_s_per_layer(engine: Engine, prompt: torch.Tensor, steps: int = 8) -> float:
    """Seconds per layer of one decode step with expert arithmetic taken out: attention, norms,
    router, sampling and this engine's own per-call dispatch (gather, policy, scatter), which
    the simulator's per-expert times do not include; measured on the decode path a run takes (its
    KV cache and attention). Where the engine decodes in one kernel call (budget 0 on the CPU,
    `native_decode`), that is the step's time less its expert math, timed inside the kernel.
    Otherwise the engine's math is swapped for one that returns zeros and its policy for all-cpu
    (no copies), then both are restored."""
    gen = engine.generator(max_batch=1)  # its decode path is fixed here; the engine's math is read per call
    math, policy, grouped = engine.store.math, engine.policy, engine.store.grouped
    if gen.native is None:
        engine.store.math, engine.store.grouped = _ZeroMath(), None  # the grouped kernel would do the expert math
        engine.policy = make_policy("all-cpu", engine.policy_ctx)
    try:
        times = _decode_step_seconds(engine, gen, prompt, steps)
    finally:
        engine.store.math, engine.policy, engine.store.grouped = math, policy, grouped
        engine.reset_counters()
    return float(np.median(times[1:] or times)) / engine.store.num_layers  # the first decode step warms up


def _decode_step_seconds(engine: Engine, gen: BatchGenerator, prompt: torch.Tensor, steps: int) -> list[float]:
    """Wall seconds of each decode step of one sequence on the engine's generator `gen`; where it
    decodes in one kernel call, less the expert math the kernel timed inside the step."""
    from haq.runtime.native_decode import STEP_PARTS

    parts, expert = np.zeros(len(STEP_PARTS) + 1), STEP_PARTS.index("expert math")
    if gen.native is not None:
        step = gen.native.step
        gen.native.step = lambda *a, **k: step(*a, **k, seconds=parts)
    gen.add(prompt.reshape(-1).tolist(), SamplingParams(max_tokens=steps + 2, ignore_eos=True))
    times = []
    while gen.has_work:
        before = parts[expert]
        gen.step()
        engine.sync()
        if gen.last_step.decode_rows and not gen.last_step.prefill_tokens:
            times.append(gen.last_step.seconds - (parts[expert] - before))
    return times


class _ZeroMath:
    """Expert math that costs nothing: what is left of a decode step is the engine's overhead."""

    def forward(self, w: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)
