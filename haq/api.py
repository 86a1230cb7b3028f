"""Python API behind the CLI: `haq.api.quantize(model, recipe, out)`, `haq.api.load(path)`."""
from __future__ import annotations

from pathlib import Path

import torch

from haq.quant.recipe import Recipe


def load(name_or_path: str | Path):
    """(model, tokenizer) of a float model, zoo name or haq checkpoint."""
    from haq.models.loading import load_model

    model, tokenizer, _ = load_model(name_or_path)
    return model, tokenizer


def quantize(model: str | Path, recipe: Recipe, out: str | Path, calib: str = "wiki-offline",
             nsamples: int = 128, seqlen: int = 2048, seed: int = 0, progress: bool = True) -> Path:
    """Quantize a model folder (or zoo name) and write a checkpoint to `out`. Finished layers are
    kept in a sibling `.OUT.partial` folder, so an interrupted run resumes where it stopped."""
    import shutil

    from haq.checkpoint import save_quantized
    from haq.data.corpora import calib_windows, dataset_identity, resolve
    from haq.models.adapters import adapter_for
    from haq.models.loading import load_model
    from haq.quant.pipeline import quantize_model

    resolve(calib)  # a bad dataset fails before the model loads
    float_model, tokenizer, path = load_model(model, dtype=torch.float32)
    adapter_for(float_model.config)
    windows = calib_windows(calib, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed)
    out = Path(out)
    work = out.parent / f".{out.name}.partial" / recipe.fingerprint()
    report = quantize_model(float_model, recipe, windows, work_dir=work, progress=progress)
    identity = {**dataset_identity(calib), "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "model": str(path)}
    save_quantized(float_model, tokenizer, out, report, identity)
    shutil.rmtree(work.parent, ignore_errors=True)
    return out
