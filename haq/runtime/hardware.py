"""Hardware profiles: how long an expert call takes on the CPU, on the device, and over the link.

The profile holds rates (bytes/s, ops/s, seconds), never per-expert times, so one profile serves a
168 MiB Mixtral expert and a 2 MiB toy expert alike: `profile.expert_times(bytes, flops)` turns the
rates into the time model of one expert shape. Every number carries a `source` (public spec, a
derived estimate and how, or a measurement), so a reader can tell a datasheet from a guess.

Time model of one expert call with n routed tokens on a processor (CPU or device):
  t(n) = overhead + bytes / mem_bw + n * flops_per_token / int8_ops
(the weights are streamed once per call, then every token costs its multiply-adds; the sum, not
the max, of the two terms is the conservative "a + b n" form, exact when they do not overlap).
Host -> device copy: t_copy = latency + bytes / link_bw.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from importlib import resources
from pathlib import Path

from haq.errors import HaqError
from haq.io import atomic_write_text


@dataclass(frozen=True)
class Quantity:
    value: float
    unit: str
    source: str  # "public spec: ...", "derived: ... from ...", "measured: ... on ..."


@dataclass(frozen=True)
class Processor:
    """A CPU or a device running int8 expert GEMMs."""

    mem_bw: Quantity  # B/s, effective for streaming weights
    int8_ops: Quantity  # op/s, effective for int8 GEMM (2 ops per multiply-add)
    overhead: Quantity  # s per expert call (dispatch, kernel launches)

    def expert_time(self, nbytes: float, flops_per_token: float, n: int) -> float:
        return self.overhead.value + nbytes / self.mem_bw.value + n * flops_per_token / self.int8_ops.value


@dataclass(frozen=True)
class Link:
    """Host -> device copies of pinned host memory."""

    bw: Quantity  # B/s, effective
    latency: Quantity  # s per copy

    def copy_time(self, nbytes: float) -> float:
        return self.latency.value + nbytes / self.bw.value


@dataclass(frozen=True)
class ExpertTimes:
    """The profile's time model for one expert shape; what the predictor and simulator call."""

    profile: HardwareProfile
    expert_bytes: int
    flops_per_token: float

    def cpu(self, n: int) -> float:
        return self.profile.cpu.expert_time(self.expert_bytes, self.flops_per_token, n)

    def device(self, n: int) -> float:
        return self.profile.device.expert_time(self.expert_bytes, self.flops_per_token, n)

    @property
    def transfer(self) -> float:
        return self.profile.link.copy_time(self.expert_bytes)

    @property
    def cpu_bw_while_copying(self) -> float:
        """CPU weight-streaming bandwidth while the link's DMA also reads host memory."""
        p = self.profile
        return min(p.cpu.mem_bw.value, p.host_memory_bw.value - p.link.bw.value)


@dataclass(frozen=True)
class ModelCosts:
    """What `haq profile-hw MODEL` measured of the model itself, so the simulator can replay its
    traces without being told: one expert's bytes and flops per token, and the rest of a decode
    step per layer (attention, norms, router, the engine's dispatch), which the expert times leave out."""

    model: str
    expert_bytes: int
    flops_per_token: float
    nonexpert_s_per_layer: Quantity


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    description: str
    cpu: Processor
    device: Processor
    link: Link
    host_memory_bw: Quantity  # B/s, all agents together (CPU cores + the link's DMA reads)
    device_memory: Quantity  # bytes on the device
    device_is_host: bool = False  # the "device" is the CPU itself: device and CPU work share its cores
    model_costs: ModelCosts | None = None  # measured for one model (haq profile-hw MODEL); presets have none

    def __post_init__(self) -> None:
        if self.host_memory_bw.value <= self.link.bw.value:
            raise HaqError(f"hardware profile {self.name}: host_memory_bw ({self.host_memory_bw.value:.3g} B/s) "
                           f"must exceed link bw ({self.link.bw.value:.3g} B/s), since copies read host memory")

    def expert_times(self, expert_bytes: int, flops_per_token: float | None = None) -> ExpertTimes:
        """Time model of one expert shape; flops default to 2 per weight byte (int8: 1 byte per weight)."""
        if expert_bytes <= 0:
            raise HaqError(f"expert_bytes must be positive, got {expert_bytes}")
        return ExpertTimes(self, int(expert_bytes), 2.0 * expert_bytes if flops_per_token is None else flops_per_token)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """The measured rates, one line per part, for a person (the file holds each one's source)."""
        def proc(p: Processor) -> str:
            return (f"{p.mem_bw.value / 1e9:.1f} GB/s streaming expert weights, {p.int8_ops.value / 1e9:.0f} Gop/s, "
                    f"{p.overhead.value * 1e6:.1f} us per call")

        lines = [f"cpu:    {proc(self.cpu)}", f"device: {proc(self.device)}",
                 f"link:   {self.link.bw.value / 1e9:.1f} GB/s, {self.link.latency.value * 1e6:.1f} us per copy; "
                 f"device memory {self.device_memory.value / 2**30:.1f} GiB"]
        if self.model_costs is not None:
            c = self.model_costs
            lines.append(f"model:  {c.model}: {c.expert_bytes / 2**20:.2f} MiB and {c.flops_per_token / 1e6:.2f} "
                         f"Mflop per expert per token, {c.nonexpert_s_per_layer.value * 1e3:.3f} ms per layer "
                         "outside the experts")
        return "\n".join(lines)

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")


# Every quantity of a profile (a latency in s, a size in B, a rate in B/s or op/s) lies in here;
# outside it the simulator's sums overflow or divide by ~0 and print inf or NaN latencies.
QUANTITY_RANGE = (1e-12, 1e18)


def _build(cls, data, where: str):
    """Dataclass from a JSON object, rejecting unknown and missing keys; Quantity values must be > 0."""
    if not isinstance(data, dict):
        raise HaqError(f"{where}: expected a JSON object, got {type(data).__name__}")
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(names))
    missing = sorted(n for n, f in names.items() if n not in data and f.default is MISSING)
    if unknown or missing:
        raise HaqError(f"{where}: " + "; ".join(
            ([f"unknown key(s) {unknown}"] if unknown else []) + ([f"missing key(s) {missing}"] if missing else [])))
    kwargs = {}
    for name, f in names.items():
        if name not in data:
            continue  # optional, keeps its default
        sub = {"Quantity": Quantity, "Processor": Processor, "Link": Link,
               "ModelCosts | None": ModelCosts}.get(str(f.type))
        optional = str(f.type).endswith("| None") and data[name] is None  # an absent section, not a bad one
        kwargs[name] = _build(sub, data[name], f"{where}.{name}") if sub and not optional else data[name]
    if cls is Quantity:
        v = kwargs["value"]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not QUANTITY_RANGE[0] <= v <= QUANTITY_RANGE[1]:
            raise HaqError(f"{where}.value must be a positive number in [{QUANTITY_RANGE[0]:g}, "
                           f"{QUANTITY_RANGE[1]:g}] (seconds, bytes, B/s or op/s), got {v!r}")
        kwargs["value"] = float(v)
    elif cls is ModelCosts:
        if not isinstance(kwargs["model"], str):
            raise HaqError(f"{where}.model must be a string")
        for key in ("expert_bytes", "flops_per_token"):
            v = kwargs[key]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not QUANTITY_RANGE[0] <= v <= QUANTITY_RANGE[1]:
                raise HaqError(f"{where}.{key} must be a positive number, got {v!r}")
        if not float(kwargs["expert_bytes"]).is_integer():
            raise HaqError(f"{where}.expert_bytes must be a whole number of bytes, got {kwargs['expert_bytes']!r}")
        kwargs["expert_bytes"] = int(kwargs["expert_bytes"])
    elif cls is HardwareProfile:
        for key in ("name", "description"):
            if not isinstance(kwargs[key], str):
                raise HaqError(f"{where}.{key} must be a string")
        if not isinstance(kwargs.get("device_is_host", False), bool):
            raise HaqError(f"{where}.device_is_host must be true or false")
    return cls(**kwargs)


def profile_from_dict(data: dict, where: str = "hardware profile") -> HardwareProfile:
    return _build(HardwareProfile, data, where)


def list_presets() -> list[str]:
    folder = resources.files("haq.runtime").joinpath("presets")
    return sorted(f.name.removesuffix(".json") for f in folder.iterdir() if f.name.endswith(".json"))


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """A preset by name (`rtx4090-pcie4`, ...) or a profile JSON file (e.g. from `haq profile-hw`)."""
    presets = list_presets()
    if str(name_or_path) in presets:
        text = resources.files("haq.runtime").joinpath(f"presets/{name_or_path}.json").read_text()
        where = f"hardware preset {name_or_path}"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise HaqError(f"unknown hardware preset or file {str(name_or_path)!r}; presets: {presets}")
        text, where = path.read_text(), f"hardware profile {path}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HaqError(f"{where}: not valid JSON ({exc})") from exc
    return profile_from_dict(data, where)
