"""`make demo`: build the bundled MoE, quantize it (rtn and haq W8A8) and compare perplexities
with fp32, run the int8 MoE with a quarter of its experts on the device, and compare offloading
policies at Mixtral scale; each step's time is printed, and a summary at the end.

Kept to minutes on 2 CPU cores with an empty cache: evaluation uses the first windows of the
wiki-offline test split (the same windows for every row), calibration a small set, the alpha grid
a coarser step than the default (haq is otherwise the default recipe: rotated, expert Hessians
shrunk toward their pool); `bench/` has the full runs, `bench/demo.py` times a fresh clone's `make demo`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from haq import zoo
from haq.data.windows import eval_windows
from haq.eval.perplexity import perplexity
from haq.io import atomic_write_text
from haq.loading import load_model

MODEL = "smollm2-8x135m"


def ppl_of(model, tokenizer, seqlen: int, windows: int) -> tuple[float, int]:
    result = perplexity(model, eval_windows("wiki-offline", tokenizer, seqlen=seqlen, max_windows=windows))
    return result.ppl, result.tokens


class Steps:
    """Numbered steps with their wall time, printed as they finish and summed at the end."""

    def __init__(self, total: int) -> None:
        self.total, self.times, self.start = total, {}, time.perf_counter()

    def run(self, title: str, fn):
        print(f"== [{len(self.times) + 1}/{self.total}] {title}", flush=True)
        t = time.perf_counter()
        result = fn()
        self.times[title] = time.perf_counter() - t
        print(f"   ({self.times[title]:.0f}s)", flush=True)
        return result

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self.start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m haq.demo", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--windows", type=int, default=2, help="wiki-offline test windows of --seqlen tokens")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--nsamples", type=int, default=8, help="calibration windows of 512 tokens")
    parser.add_argument("--prompt", default="The history of the Roman Empire")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--json", help="also write the step times and perplexities to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    torch.manual_seed(0)
    from haq.api import quantize
    from haq.quant.recipe import Recipe

    methods = ("rtn", "haq")
    steps = Steps(2 + 2 * len(methods) + 2)
    steps.run(f"building {MODEL} from the bundled smollm2-135m (cached after the first run)", lambda: zoo.build(MODEL))

    def evaluate(ref) -> tuple[float, int]:
        model, tokenizer, _ = load_model(ref)
        return ppl_of(model, tokenizer, args.seqlen, args.windows)

    rows = [(MODEL, "fp32", *steps.run("fp32 perplexity", lambda: evaluate(MODEL)))]
    with tempfile.TemporaryDirectory() as tmp:
        outs = {}
        for method in methods:
            label = f"{method} W8A8"
            # A coarser alpha grid and a smaller probe than the defaults keep the demo to minutes.
            recipe = Recipe(method=method, alpha_step=0.25, search_tokens=512)
            out = Path(tmp) / label.replace(" ", "_")
            outs[label] = steps.run(f"quantizing {MODEL} with {label} ({args.nsamples} x 512 calibration tokens)",
                                    lambda: quantize(MODEL, recipe, out, nsamples=args.nsamples, seqlen=512))
            rows.append((MODEL, label, *steps.run(f"{label} perplexity", lambda: evaluate(outs[label]))))
        print(f"\nwiki-offline test perplexity (first {args.windows} windows of {args.seqlen} tokens)\n")
        print(f"| {'model':16s} | {'weights':20s} | {'ppl':>8s} | {'vs fp32':>8s} | {'tokens':>6s} |")
        print(f"|{'-' * 18}|{'-' * 22}|{'-' * 10}|{'-' * 10}|{'-' * 8}|")
        for name, kind, ppl, tokens in rows:
            print(f"| {name:16s} | {kind:20s} | {ppl:8.3f} | {100 * (ppl / rows[0][2] - 1):+7.2f}% | {tokens:6d} |")
        best = outs["haq W8A8"]
        steps.run("running the haq W8A8 MoE offloaded (25% of expert bytes on the device)",
                  lambda: run_offloaded(best, args.prompt, args.new_tokens))
    steps.run("simulator: offloading policies at Mixtral-8x7B scale", simulate_mixtral)
    print("\nsteps: " + "; ".join(f"{title.split(' (')[0]} {s:.0f}s" for title, s in steps.times.items()))
    print(f"demo finished in {steps.wall_s:.0f}s")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps({
            "wall_s": round(steps.wall_s, 1), "steps_s": {k: round(v, 1) for k, v in steps.times.items()},
            "ppl": [{"model": m, "weights": w, "ppl": p, "tokens": t} for m, w, p, t in rows],
            "load": round(os.getloadavg()[0], 2)}, indent=1) + "\n")


def run_offloaded(checkpoint: Path, prompt: str, new_tokens: int) -> None:
    """The int8 MoE with 25% of its expert bytes on the device (this CPU stands in for it)."""
    from haq.api import default_device, open_engine

    device = default_device()
    print(f"   {checkpoint.name.replace('_', ' ')} on {device}", flush=True)
    engine, tokenizer = open_engine(checkpoint, "25%", device=device)
    try:
        tokens, metrics = engine.generate(tokenizer(prompt, return_tensors="pt").input_ids, new_tokens)
    finally:
        engine.close()
    print(prompt + tokenizer.decode(tokens))
    print(metrics.summary())


def simulate_mixtral() -> None:
    """Policies on the synthetic Mixtral-8x7B-scale trace, RTX 4090 + PCIe 4.0 preset."""
    from haq.runtime.hardware import load_profile
    from haq.runtime.synthetic import (MIXTRAL_EXPERT_BYTES, MIXTRAL_EXPERT_FLOPS, MIXTRAL_NONEXPERT_BYTES_PER_LAYER,
                                       generate_synthetic_trace)
    from haq.sim.tuning import format_table, simulate

    trace = generate_synthetic_trace(num_sequences=8, seq_len=128, seed=0)
    total = MIXTRAL_EXPERT_BYTES * trace.meta.layers * trace.meta.num_experts
    rows = simulate(trace, load_profile("rtx4090-pcie4"), [total // 4, total // 2], MIXTRAL_EXPERT_BYTES,
                    ["all-cpu", "lru", "fiddler", "llamacpp", "haq"], flops_per_token=MIXTRAL_EXPERT_FLOPS,
                    nonexpert_bytes_per_layer=MIXTRAL_NONEXPERT_BYTES_PER_LAYER)
    print("   synthetic Mixtral-8x7B-scale trace (int8 experts), RTX 4090 + PCIe 4.0 preset\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
