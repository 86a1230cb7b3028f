"""The quantizer's device path on a lent GPU (issue 13, item 4), one short script (a few minutes):

1. tiny-mixtral (the bundled assets): the default haq recipe with `device` cpu and cuda on the same
   calibration windows: seconds, and the two quantized models' logits on held-out windows
   (relative mean difference, argmax agreement, perplexity of each).
2. One decoder layer at Mixtral-8x7B width (hidden 4096, 8 experts of 14336, 32 / 8 heads, random
   weights with the norm outliers of `bench/scale.py`, built in memory: no tokenizer or dataset
   needed): the default haq recipe on the GPU, seconds per layer and peak GPU memory, against the
   CPU's seconds per layer in scale.md (another machine: both are stated).

Writes OUT/quant-device.{json,md} (OUT: --out, default bench/results). `--smoke` runs both parts
at toy width on the CPU to check the script. tiny-mixtral reads --text (a carried file: the GPU machine
has no dataset package), else random token windows; the wide layer always random tokens.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import failure  # noqa: E402
from haq.io import atomic_write_text  # noqa: E402

TINY = ROOT / "haq" / "zoo" / "assets" / "tiny-mixtral"
MIXTRAL_LAYER = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                     num_local_experts=8, num_experts_per_tok=2)


def windows(vocab: int, n: int, seqlen: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def quantize_on(model, device: str, calib: torch.Tensor, keep: bool = True) -> tuple:
    """`model` quantized on `device` (a copy of it when `keep`), the seconds and the report."""
    from haq.quant.pipeline import quantize_model
    from haq.quant.recipe import Recipe

    model = copy.deepcopy(model) if keep else model
    start = time.perf_counter()
    report = quantize_model(model, Recipe(method="haq"), calib, progress=False, device=device)
    synchronize(device)
    return model, time.perf_counter() - start, report


@torch.no_grad()
def compare(a, b, ids: torch.Tensor) -> dict:
    from torch.nn import functional as F

    la, lb = a(ids).logits.float(), b(ids).logits.float()

    def ppl(logits):
        return float(torch.exp(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))))

    return {"rel_mean_abs_diff": float((la - lb).abs().mean() / lb.abs().mean()),
            "argmax_agreement": float((la.argmax(-1) == lb.argmax(-1)).float().mean()),
            "ppl_device": ppl(la), "ppl_cpu": ppl(lb)}


def text_windows(text: str, n: int, seqlen: int) -> torch.Tensor:
    """The first n windows of `text` in tiny-mixtral's tokens."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(TINY)(text, return_tensors="pt").input_ids[0]
    if ids.numel() < n * seqlen:
        raise SystemExit(f"--text has {ids.numel()} tokens, need {n * seqlen}")
    return ids[:n * seqlen].view(n, seqlen)


def tiny_part(device: str, nsamples: int, seqlen: int, text: str | None) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
    if text is None:
        calib, held_out = windows(model.config.vocab_size, nsamples, seqlen, 0), windows(model.config.vocab_size, 4, seqlen, 1)
    else:
        data = text_windows(text, nsamples + 4, seqlen)
        calib, held_out = data[:nsamples], data[nsamples:]
    on_device, device_s, _ = quantize_on(model, device, calib)
    on_cpu, cpu_s, _ = quantize_on(model, "cpu", calib)
    return {"model": "tiny-mixtral", "device_s": round(device_s, 2), "cpu_s": round(cpu_s, 2),
            **compare(on_device, on_cpu, held_out)}


def wide_part(device: str, shape: dict, nsamples: int, seqlen: int) -> dict:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=32000, num_hidden_layers=1, max_position_embeddings=4096, **shape)
    start = time.perf_counter()
    with torch.device("cpu"):
        model = MixtralForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():  # scale.py's outliers: a few channels of every norm large
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            channels = torch.randperm(p.shape[0], generator=gen)[:8]
            p.data[channels] = 20 + 20 * torch.rand(8, generator=gen)
    build_s = time.perf_counter() - start
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _, seconds, report = quantize_on(model, device, windows(config.vocab_size, nsamples, seqlen, 0), keep=False)
    row = {"model": f"mixtral-width layer (hidden {shape['hidden_size']}, {shape['num_local_experts']} x "
                    f"{shape['intermediate_size']})", "device": device, "s_per_layer": round(report.layers[0].seconds, 1),
           "total_s": round(seconds, 1), "build_s": round(build_s, 1)}
    if torch.device(device).type == "cuda":
        row["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="toy width on the CPU: checks the script")
    parser.add_argument("--skip-wide", action="store_true")
    parser.add_argument("--text", help="a text file for tiny-mixtral's calibration and held-out windows "
                                       "(default: random tokens; the device has no dataset package)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    shape = dict(MIXTRAL_LAYER, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2) if args.smoke else MIXTRAL_LAYER
    results = {"device": args.device, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
               "torch": torch.__version__, "nsamples": args.nsamples, "seqlen": args.seqlen}
    results["windows"] = f"text from {Path(args.text).name}" if args.text else "random-token"
    if args.text and not Path(args.text).is_file():
        sys.exit(f"--text {args.text}: no such file (`make gpu-text` writes .gpu/text.txt)")
    text = Path(args.text).read_text() if args.text else None
    out = Path(args.out)
    results["tiny"] = tiny_part(args.device, args.nsamples, args.seqlen, text)
    print(json.dumps(results["tiny"]), flush=True)
    write(out, results, args)  # now, so a wide part that fails or runs over its cap loses only itself
    scale = ROOT / "bench" / "results" / "scale.json"
    if not args.skip_wide:
        try:
            results["wide"] = wide_part(args.device, shape, args.nsamples, args.seqlen)
        except Exception as error:  # noqa: BLE001 - recorded beside the tiny part
            results["wide"] = failure(error)
        print(json.dumps(results["wide"]), flush=True)
        if scale.is_file():  # the CPU reference: the haq cell of scale.md (its machine and calibration)
            reference = json.loads(scale.read_text())
            row = next((r for r in reference["rows"] if r["method"] == "haq" and r["offload"]), None)
            results["cpu_reference"] = row and {"s_per_layer": row.get("s_per_layer"), "cpu": reference["machine"]["cpu"],
                                                "threads": reference["machine"]["threads"], **reference["calibration"]}
        write(out, results, args)


def write(out: Path, results: dict, args) -> None:
    """quant-device.json and .md from what has been measured so far."""
    atomic_write_text(out / "quant-device.json", json.dumps(results, indent=2) + "\n")
    t = results["tiny"]
    lines = [f"# The quantizer on {results['gpu'] or 'the CPU'} (`bench/gpu_quant.py`, device {args.device}, "
             f"torch {results['torch']}, {args.nsamples} x {args.seqlen} {results['windows']} windows)", "",
             "| model | device s | cpu s | logits rel. mean abs diff | argmax agreement | ppl device | ppl cpu |",
             "|---|---|---|---|---|---|---|",
             f"| {t['model']} | {t['device_s']} | {t['cpu_s']} | {t['rel_mean_abs_diff']:.4f} | "
             f"{t['argmax_agreement']:.3f} | {t['ppl_device']:.3f} | {t['ppl_cpu']:.3f} |"]
    w = results.get("wide")
    if w is not None and "error" in w:
        lines += ["", f"The Mixtral-width layer failed: {w['error']}"]
    elif w is not None:
        lines += ["", f"{w['model']}, default haq: **{w['s_per_layer']} s per layer** on {args.device}"
                  + (f", peak GPU memory {w['peak_gpu_gb']} GB" if "peak_gpu_gb" in w else "") + "."]
        ref = results.get("cpu_reference")
        if ref:
            lines.append(f"CPU reference (scale.md's haq cell): {ref['s_per_layer']} s per layer on {ref['cpu']}, "
                         f"{ref['threads']} threads, {ref['nsamples']} x {ref['seqlen']} wiki-offline windows.")
    atomic_write_text(out / "quant-device.md", "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
