"""`make demo`: build the bundled models, quantize the MoE and compare perplexities, run the int8
MoE with a quarter of its experts on the device, and compare offloading policies at Mixtral scale.

Kept to a few minutes on 2 CPU cores: evaluation uses the first windows of the wiki-offline test
split (the same windows for every row) and a small calibration set; `bench/` has the full runs.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from haq import zoo
from haq.data.windows import eval_windows
from haq.eval.perplexity import perplexity
from haq.loading import load_model


def ppl_of(model, tokenizer, seqlen: int, windows: int) -> tuple[float, int]:
    result = perplexity(model, eval_windows("wiki-offline", tokenizer, seqlen=seqlen, max_windows=windows))
    return result.ppl, result.tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m haq.demo", description=__doc__)
    parser.add_argument("--windows", type=int, default=2, help="wiki-offline test windows of --seqlen tokens")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--nsamples", type=int, default=8, help="calibration windows of 512 tokens")
    parser.add_argument("--prompt", default="The history of the Roman Empire")
    parser.add_argument("--new-tokens", type=int, default=24)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    torch.manual_seed(0)
    start = time.perf_counter()
    rows = []
    for name in ("smollm2-135m", "smollm2-8x135m", "tiny-mixtral"):
        print(f"== building {name} (cached after the first run)", flush=True)
        zoo.build(name)
        model, tokenizer, _ = load_model(name)
        ppl, tokens = ppl_of(model, tokenizer, args.seqlen, args.windows)
        rows.append((name, "fp32", ppl, tokens))
        del model

    from haq.api import quantize
    from haq.quant.recipe import Recipe

    with tempfile.TemporaryDirectory() as tmp:
        for method, rotate in (("rtn", False), ("haq", False), ("haq", True)):
            label = f"{method} W8A8" + (" --rotate" if rotate else "")
            print(f"== quantizing smollm2-8x135m with {label}", flush=True)
            # A coarser alpha grid and a smaller probe than the defaults keep the demo to minutes.
            recipe = Recipe(method=method, alpha_step=0.25, search_tokens=512, rotate=rotate)
            out = quantize("smollm2-8x135m", recipe, Path(tmp) / label.replace(" ", "_"), nsamples=args.nsamples,
                           seqlen=512)
            model, tokenizer, _ = load_model(out)
            ppl, tokens = ppl_of(model, tokenizer, args.seqlen, args.windows)
            rows.append(("smollm2-8x135m", label, ppl, tokens))
            del model
        print(f"\nwiki-offline test perplexity (first {args.windows} windows of {args.seqlen} tokens)\n")
        print(f"| {'model':16s} | {'weights':20s} | {'ppl':>8s} | {'tokens':>6s} |")
        print(f"|{'-' * 18}|{'-' * 22}|{'-' * 10}|{'-' * 8}|")
        for name, kind, ppl, tokens in rows:
            print(f"| {name:16s} | {kind:20s} | {ppl:8.3f} | {tokens:6d} |")
        run_offloaded(Path(tmp) / "haq_W8A8_--rotate", args.prompt, args.new_tokens)
    simulate_mixtral()
    print(f"\ndemo finished in {time.perf_counter() - start:.0f}s")


def run_offloaded(checkpoint: Path, prompt: str, new_tokens: int) -> None:
    """The int8 MoE with 25% of its expert bytes on the device (this CPU stands in for it)."""
    from haq.api import default_device, open_engine

    device = default_device()
    print(f"\n== running the haq W8A8 --rotate smollm2-8x135m offloaded: 25% of expert bytes on {device}", flush=True)
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
    print("\n== simulator: synthetic Mixtral-8x7B-scale trace (int8 experts), RTX 4090 + PCIe 4.0 preset\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
