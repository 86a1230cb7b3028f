"""`make demo`: build the bundled models, then quantize the MoE and compare perplexities.

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
from haq.data.corpora import eval_windows
from haq.eval.perplexity import perplexity
from haq.models.loading import load_model


def ppl_of(model, tokenizer, seqlen: int, windows: int) -> tuple[float, int]:
    result = perplexity(model, eval_windows("wiki-offline", tokenizer, seqlen=seqlen, max_windows=windows))
    return result.ppl, result.tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m haq.demo", description=__doc__)
    parser.add_argument("--windows", type=int, default=4, help="wiki-offline test windows of --seqlen tokens")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--nsamples", type=int, default=16, help="calibration windows of 512 tokens")
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
        for method in ("rtn", "haq"):
            print(f"== quantizing smollm2-8x135m with {method} W8A8", flush=True)
            out = quantize("smollm2-8x135m", Recipe(method=method), Path(tmp) / method,
                           nsamples=args.nsamples, seqlen=512)
            model, tokenizer, _ = load_model(out)
            ppl, tokens = ppl_of(model, tokenizer, args.seqlen, args.windows)
            rows.append(("smollm2-8x135m", f"{method} W8A8", ppl, tokens))
            del model

    print(f"\nwiki-offline test perplexity (first {args.windows} windows of {args.seqlen} tokens)\n")
    print(f"| {'model':16s} | {'weights':11s} | {'ppl':>8s} | {'tokens':>6s} |")
    print(f"|{'-' * 18}|{'-' * 13}|{'-' * 10}|{'-' * 8}|")
    for name, kind, ppl, tokens in rows:
        print(f"| {name:16s} | {kind:11s} | {ppl:8.3f} | {tokens:6d} |")
    print(f"\ndemo finished in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
