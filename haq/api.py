"""Composition: the Python API behind the CLI, the demo and the benchmarks. Loads models and
checkpoints, quantizes into a checkpoint, and builds an engine with its policy context:
`haq.api.quantize(model, recipe, out)`, `haq.api.load(path)`, `haq.api.open_engine(model, budget)`."""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch

from haq.errors import HaqError, validated
from haq.io import check_output_dir
from haq.quant.recipe import Recipe

log = logging.getLogger(__name__)


@validated
def load(name_or_path: str | Path):
    """(model, tokenizer) of a float model, zoo name or haq checkpoint."""
    from haq.loading import load_model

    model, tokenizer, _ = load_model(name_or_path)
    return model, tokenizer


def run_key(recipe: Recipe, model_dir: Path, windows: torch.Tensor) -> str:
    """What a resumable run is: the recipe, the model (its config and weight files by name, size and
    mtime) and the exact calibration tokens. A finished layer is reused only under the same key,
    so a run of another model or calibration into the same output starts afresh."""
    import hashlib

    digest = hashlib.sha256(recipe.fingerprint().encode())
    for file in sorted(model_dir.iterdir()):
        if file.name == "config.json":
            digest.update(file.read_bytes())
        elif file.suffix in (".safetensors", ".bin"):
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(windows.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


OFFLOAD_SHARE = 0.5
"""`offload=None` offloads when the float32 model would take more than this share of available RAM."""


def offload_needed(path: Path) -> bool:
    """Would the float32 model crowd host memory? (its weight files, at float32, vs available RAM)"""
    import psutil

    from haq.checkpoint.layer_source import ShardedCheckpoint

    try:
        ckpt = ShardedCheckpoint(path)
    except HaqError:  # no safetensors: only the in-memory path can load it
        return False
    elements = sum(math.prod(shape) for shape in ckpt.shapes.values())
    return 4 * elements > OFFLOAD_SHARE * psutil.virtual_memory().available


ACTIVATION_SHARE = 0.8
"""The calibration activations may take at most this share of the available RAM."""


def check_activation_memory(hidden: int | None, nsamples: int, seqlen: int) -> None:
    """A layer's input and output activations (float32, 8 n S H bytes: the term of the peak that
    grows with the calibration set) must fit in host memory, or the kernel kills the run hours in."""
    import psutil

    if not isinstance(hidden, int) or hidden < 1:
        return  # a config without a top-level width: the load checks it
    need, available = 8 * nsamples * seqlen * hidden, psutil.virtual_memory().available
    if need > ACTIVATION_SHARE * available:
        fits = int(ACTIVATION_SHARE * available // (8 * seqlen * hidden))
        fix = f"lower --nsamples to {fits} or --seqlen" if fits >= 1 else "lower --seqlen"
        raise HaqError(f"--nsamples {nsamples} x --seqlen {seqlen}: the calibration activations take "
                       f"{need / 2**30:.1f} GiB (8 x n x S x hidden {hidden} bytes) and {available / 2**30:.1f} GiB "
                       f"of RAM are available: {fix}")


@validated
def quantize(model: str | Path, recipe: Recipe, out: str | Path, calib: str = "wiki-offline",
             nsamples: int = 128, seqlen: int = 2048, seed: int = 0, progress: bool = True,
             offload: bool | None = None, device: str = "cpu") -> Path:
    """Quantize a model folder (or zoo name) and write a checkpoint to `out`. Finished layers are
    kept in a sibling `.OUT.partial` folder, so an interrupted run resumes where it stopped.
    `offload`: read one decoder layer at a time from the shards instead of loading the model
    (None: when the float32 model would take more than half of the available RAM). `device`: where
    each decoder layer is calibrated and quantized (cpu, or cuda: each layer goes to the GPU and back)."""
    import shutil

    from haq.checkpoint.layer_source import LayerSource
    from haq.checkpoint.native import CONFIG_NAME, OWN_FILES, save_quantized
    from haq.data.sources import dataset_identity, resolve
    from haq.data.windows import calib_windows
    from haq.loading import (check_seqlen, load_model, load_tokenizer, read_config, refuse_orphaned_checkpoint,
                              resolve_model_path)
    from haq.quant.pipeline import partial_paths, quantize_model

    out = Path(out)
    check_device(device)
    check_output_dir(out, CONFIG_NAME, "haq checkpoint", OWN_FILES)  # before hours of work, not after
    resolve(calib)  # a bad dataset fails before the model loads
    path = resolve_model_path(model)
    if (path / CONFIG_NAME).is_file():
        raise HaqError(f"{model} is already a haq checkpoint: quantize the float model it was made from")
    config = read_config(path)
    if device == "cpu":
        check_activation_memory(config.get("hidden_size"), nsamples, seqlen)
    if offload is None:
        offload = offload_needed(path)
    source = None
    if offload:
        refuse_orphaned_checkpoint(path)
        source = LayerSource.open(path)
        float_model, tokenizer = source.model, load_tokenizer(path)
    else:
        float_model, tokenizer, path = load_model(path, dtype=torch.float32)
    check_seqlen(float_model, seqlen)
    windows = calib_windows(calib, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed)
    work = out.parent / f".{out.name}.partial" / run_key(recipe, path, windows)
    for other in sorted(work.parent.glob("*")) if work.parent.is_dir() else []:
        if other != work:  # another model, recipe or calibration: never mixed in
            log.warning("discarding the unfinished run in %s (another model, recipe or calibration)", other)
            shutil.rmtree(other, ignore_errors=True)
    report = quantize_model(float_model, recipe, windows, work_dir=work, progress=progress, source=source,
                            device=device)
    identity = {**dataset_identity(calib), "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "model": str(path)}
    layer_files = []
    if source is not None:
        layer_files = [(f"{source.adapter.layers}.{i}.", partial_paths(work, i)[0]) for i in range(len(source.layers))]
    save_quantized(float_model, tokenizer, out, report, identity, layer_files)
    shutil.rmtree(work.parent, ignore_errors=True)
    return out


UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
         "tib": 2**40}


def parse_budget(text: str, total_expert_bytes: int) -> int:
    """'6GiB', '512MB', '123456' (bytes) or '25%' (of all expert bytes) -> bytes."""
    value = str(text).strip().lower()
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(%|[kmgt]i?b|b)?", value)
    if not match:
        raise HaqError(f"--gpu-budget {text!r}: expected bytes (e.g. 6GiB, 512MB, 1000000) or a percentage (25%)")
    number, unit = float(match.group(1)), match.group(2) or ""
    if unit in ("", "b") and not number.is_integer():  # 0.5 is half a byte: the user meant a share
        share = f"; for a share of the expert bytes write a percentage ({number * 100:g}%)" if number < 1 else ""
        raise HaqError(f"--gpu-budget {text}: a byte count is a whole number, or give a unit (1.5GB){share}")
    if unit == "%":
        if number > 100:
            raise HaqError(f"--gpu-budget {text}: a percentage of the expert bytes must be <= 100%")
        return int(total_expert_bytes * number / 100)
    return int(number * UNITS[unit])


def profile_trace_for(model, tokenizer, model_name: str, dataset: str = "wiki-offline", windows: int = 8,
                      seqlen: int = 256):
    """A routing profile recorded on calibration text (train split), for placement."""
    from haq.data.windows import calib_windows
    from haq.runtime.record import record_trace

    ids = calib_windows(dataset, tokenizer, nsamples=windows, seqlen=seqlen, seed=0)
    return record_trace(model, ids, model_name, source=f"hf-hooks on {dataset} train", progress=False)


@validated
def open_engine(model_ref: str | Path, budget: str, device: str = "cpu", policy: str = "haq",
                hardware: str | None = None, profile: str | Path | None = None, int8_backend: str | None = None):
    """(engine, tokenizer): load the model, measure or load the hardware profile, place, serve."""
    from haq.loading import load_model
    from haq.models.adapters import adapter_for
    from haq.runtime.hardware import load_profile
    from haq.runtime.profile_hw import profile_hardware
    from haq.runtime.store import extract_experts
    from haq.runtime.trace import load_trace

    model, tokenizer, path = load_model(model_ref, int8_backend=int8_backend)
    adapter = adapter_for(model.config)
    if adapter.moe is None:
        raise HaqError(f"{path} is a dense {model.config.model_type} model: the MoE runtime needs experts")
    moe_layers = adapter.moe_layers(model.config)
    first = adapter.decoder_layers(model)[moe_layers[0]].get_submodule(adapter.moe.experts)
    weights, math = extract_experts(first)
    total = weights[0].nbytes * len(weights) * len(moe_layers)
    budget_bytes = parse_budget(budget, total)
    trace = load_trace(profile) if profile else profile_trace_for(model, tokenizer, path.name)
    check_profile(trace, model)  # before minutes of hardware profiling
    hw = load_profile(hardware) if hardware else profile_hardware(weights[0], math, device=device)
    engine = build_engine(model, budget_bytes=budget_bytes, hardware=hw, policy=policy, profile=trace, device=device)
    return engine, tokenizer


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> None:
    """cpu, or a CUDA device that exists in this torch build and machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise HaqError(f"--device {device!r} is not a device: use cpu or cuda (cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise HaqError(f"--device {device}: this torch build or machine has no CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise HaqError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise HaqError(f"--device {device}: haq runs on cpu or cuda")


def check_profile(trace, model) -> None:
    """A routing profile must come from this model's routing: same MoE layers, experts and top-k,
    and at least one token; another model's trace would index experts that do not exist."""
    from haq.models.adapters import adapter_for

    adapter = adapter_for(model.config)
    if adapter.moe is None:
        raise HaqError(f"{model.config.model_type} is a dense model: the MoE runtime needs a model with experts")
    ours = (len(adapter.moe_layers(model.config)), getattr(model.config, adapter.moe.num_experts_attr),
            getattr(model.config, adapter.moe.top_k_attr))
    theirs = (trace.meta.layers, trace.meta.num_experts, trace.meta.top_k)
    if theirs != ours:
        raise HaqError(f"the routing profile ({trace.meta.model}: {theirs[0]} MoE layers, {theirs[1]} experts, "
                       f"top-{theirs[2]}) is not this model's ({ours[0]} MoE layers, {ours[1]} experts, top-{ours[2]}): "
                       "record one with `haq profile MODEL -o T.npz`")
    if trace.num_tokens == 0:
        raise HaqError(f"the routing profile ({trace.meta.model}) has no tokens: record one with `haq profile MODEL`")


def build_engine(model, *, budget_bytes: int, hardware, policy: str = "haq", profile=None, device: str = "cpu",
                 cpu_workers: int = 1):
    """An `Engine` for `model` with policy `policy`, its context built from the routing `profile`
    (haq's pin share tuned on it by the simulator)."""
    from haq.runtime.engine import Engine
    from haq.sim.tuning import policy_context

    if profile is None:
        raise HaqError("the engine needs a routing profile (a trace): record one with `haq trace`")
    check_profile(profile, model)
    engine = Engine(model, budget_bytes=budget_bytes, hardware=hardware, device=device, cpu_workers=cpu_workers)
    engine.use_policy(policy, policy_context(profile, engine.budget_bytes, engine.expert_bytes, engine.predictor))
    return engine
