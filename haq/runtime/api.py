"""Runtime entry points shared by the CLI, the demo and the benchmarks."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from haq.errors import HaqError

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_budget(text: str, total_expert_bytes: int) -> int:
    """'6GiB', '512MB', '123456' (bytes) or '25%' (of all expert bytes) -> bytes."""
    value = str(text).strip().lower()
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(%|[kmg]i?b|b)?", value)
    if not match:
        raise HaqError(f"--gpu-budget {text!r}: expected bytes (e.g. 6GiB, 512MB, 1000000) or a percentage (25%)")
    number, unit = float(match.group(1)), match.group(2) or ""
    if unit == "%":
        if number > 100:
            raise HaqError(f"--gpu-budget {text}: a percentage of the expert bytes must be <= 100%")
        return int(total_expert_bytes * number / 100)
    return int(number * UNITS[unit])


def profile_trace_for(model, tokenizer, model_name: str, dataset: str = "wiki-offline", windows: int = 8,
                      seqlen: int = 256):
    """A routing profile recorded on calibration text (train split), for placement."""
    from haq.data.corpora import calib_windows
    from haq.runtime.record import record_trace

    ids = calib_windows(dataset, tokenizer, nsamples=windows, seqlen=seqlen, seed=0)
    return record_trace(model, ids, model_name, source=f"hf-hooks on {dataset} train", progress=False)


def open_engine(model_ref: str | Path, budget: str, device: str = "cpu", policy: str = "haq",
                hardware: str | None = None, profile: str | Path | None = None):
    """(engine, tokenizer): load the model, measure or load the hardware profile, place, serve."""
    from haq.models.adapters import adapter_for
    from haq.models.loading import load_model
    from haq.runtime.engine import Engine
    from haq.runtime.hardware import load_profile
    from haq.runtime.profile_hw import profile_hardware
    from haq.runtime.store import extract_experts
    from haq.runtime.trace import load_trace

    model, tokenizer, path = load_model(model_ref)
    adapter = adapter_for(model.config)
    if adapter.moe is None:
        raise HaqError(f"{path} is a dense {model.config.model_type} model: the MoE runtime needs experts")
    first = adapter.decoder_layers(model)[0].get_submodule(adapter.moe.experts)
    weights, math = extract_experts(first)
    total = weights[0].nbytes * len(weights) * len(adapter.decoder_layers(model))
    budget_bytes = parse_budget(budget, total)
    hw = load_profile(hardware) if hardware else profile_hardware(weights[0], math, device=device)
    trace = load_trace(profile) if profile else profile_trace_for(model, tokenizer, path.name)
    engine = Engine(model, budget_bytes=budget_bytes, hardware=hw, policy=policy, profile=trace, device=device)
    return engine, tokenizer


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
