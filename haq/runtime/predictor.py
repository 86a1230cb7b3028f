"""Per-call cost model: run an expert call on the CPU, or copy the weights and run it on the device.

For a call with n routed tokens (1 in decode, up to the prompt length in prefill):
  cpu:      cpu_backlog + t_cpu(n)                (CPU calls of this layer already assigned)
  copy:     link_backlog + t_copy + t_dev(n)      (copies already queued on the link)
  resident: ready_in + t_dev(n)                   (ready_in > 0 while a background copy lands)
and the call goes where it finishes first. Deciding a layer's calls one by one, largest n first,
this is greedy list scheduling over the two parallel resources (CPU, link + device): in prefill
it splits experts between the CPU and copies instead of sending all of them one way.
Constants come from a HardwareProfile (measured or spec-derived), never from this file.
When the profile's device is the host CPU itself (`device_is_host`), there is one resource, not
two: both backlogs are on the same cores, and a copy is time those cores do not compute.

Admission. A copy made for the call itself costs nothing extra to keep: it is admitted when it is
expected to serve more than what it evicts (expected_reuse > 0). A call served by the CPU may
still start a background copy so later calls hit; that copy is not free: its DMA reads host
memory while the CPU streams weights from the same DRAM, slowing the CPU by about
  lost = t_copy * (1 - bw_cpu_while_copying / bw_cpu)
and every later device use saves  t_cpu(1) - t_dev(1). So a background copy pays off only when the
expected reuse while cached exceeds  lost / saving  (`break_even_reuse`), and only when the link is
idle enough that the copy lands in time to be useful (`max_backlog_s`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from haq.runtime.cache import Key
from haq.runtime.hardware import HardwareProfile

Where = Literal["device", "cpu"]


@dataclass(slots=True)  # not frozen: a frozen dataclass costs 3x more to build, and one is built per call
class Decision:
    where: Where
    transfer: bool  # copy the weights host -> device: blocking when where == "device", background when "cpu"
    admit: bool  # keep the copied weights in the device cache
    est_s: float  # predicted finish time of the call from now (queued work and copies included)
    evicted: tuple[Key, ...] = ()  # cache entries the admission pushed out (the engine frees their slots)
    ahead: bool = False  # on the device from the copy `Policy.prefill_ahead` started (not a cache hit)


class CostPredictor:
    def __init__(self, profile: HardwareProfile, expert_bytes: int, flops_per_token: float | None = None,
                 max_backlog_s: float | None = None) -> None:
        self.times = profile.expert_times(expert_bytes, flops_per_token)
        t = self.times
        self._transfer = t.transfer
        # a background copy is worth queueing only if it can land within about one copy time
        self.max_backlog_s = self._transfer if max_backlog_s is None else max_backlog_s
        self.shared = profile.device_is_host
        # expected later device uses a background copy needs to repay the CPU time it costs
        lost = self._transfer if self.shared else \
            self._transfer * (1.0 - t.cpu_bw_while_copying / profile.cpu.mem_bw.value)
        saving = t.cpu(1) - t.device(1)
        self.break_even_reuse = lost / saving if saving > 0 else math.inf  # no saving: never worth it
        self._cpu: dict[int, float] = {}  # memo: the simulator asks for the same n millions of times
        self._dev: dict[int, float] = {}

    def t_cpu(self, n: int) -> float:
        t = self._cpu.get(n)
        if t is None:
            t = self._cpu[n] = self.times.cpu(n)
        return t

    def t_transfer(self) -> float:
        return self._transfer

    def t_device(self, n: int) -> float:
        t = self._dev.get(n)
        if t is None:
            t = self._dev[n] = self.times.device(n)
        return t

    def decide(self, n: int, resident: bool, *, ready_in_s: float = 0.0, link_backlog_s: float = 0.0,
               cpu_backlog_s: float = 0.0, expected_reuse: float = 0.0) -> Decision:
        """Where to run a call with n tokens.

        `resident`: the weights are cached on the device, landing in `ready_in_s` (0: ready now; a
        background copy may still be in flight). `expected_reuse`: device uses this expert would
        serve while cached, net of what its eviction victim would have served (<= 0: keep no copy).
        """
        if self.shared:  # one timeline: whatever is queued anywhere runs before this call
            cpu_backlog_s = link_backlog_s = cpu_backlog_s + link_backlog_s
        cpu = cpu_backlog_s + self.t_cpu(n)
        if resident:
            wait = ready_in_s + self.t_device(n)
            if ready_in_s <= 0.0 or wait <= cpu:
                return Decision("device", transfer=False, admit=False, est_s=wait)
            return Decision("cpu", transfer=False, admit=False, est_s=cpu)
        dev = link_backlog_s + self._transfer + self.t_device(n)
        if dev < cpu:
            return Decision("device", transfer=True, admit=expected_reuse > 0.0, est_s=dev)
        background = link_backlog_s <= self.max_backlog_s and expected_reuse > self.break_even_reuse
        return Decision("cpu", transfer=background, admit=background, est_s=cpu)
