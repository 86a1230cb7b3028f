"""Engine decode profile: where a decode step's time goes. Writes bench/results/engine-profile.json
and engine-profile.md (`--name` for another file; engine-profile-before.* is this profile of the
engine before the issue-12 work, commit 611b616).

`--profile` (the only mode so far): a warm engine decodes with wall-clock timers around the parts
of a step (forward hooks on modules, wrappers around the engine's functions; CPU, so no syncs):
  attention    the decoder's self-attention modules, their projections included
  router       the MoE routers
  expert math  the expert MLPs (`ExpertMath.forward`, or a layer's grouped kernel call)
  dispatch     the rest of the engine's MoE call: routing the calls, the policy, gather and scatter
  lm_head      the output projection
  other        the rest of the step: embeddings, norms, residuals, HF glue, sampling, the KV cache
and, overlapping them, `act quant`: per-token activation quantization done by PyTorch ops (inside
the int8 projections and experts on the FBGEMM / _int_mm / float backends; haq's native kernels
quantize inside their own call, counted in their part). Float model and int8 checkpoint, batch 1
and 8, budget 0.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from common import git_rev, machine, md_table, write_results

PARTS = ["attention", "router", "expert math", "dispatch", "lm_head", "other", "act quant"]


class Clock:
    """Seconds per part, counted only while `on` (the decode steps, not the prefill)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.on = False

    def add(self, part: str, start: float) -> None:
        if self.on:
            self.seconds[part] += time.perf_counter() - start

    def wrap(self, part: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(part, start)
        return timed

    def hook(self, module, part: str) -> list:
        starts = []
        return [module.register_forward_pre_hook(lambda m, a: starts.append(time.perf_counter())),
                module.register_forward_hook(lambda m, a, o: self.add(part, starts.pop()))]


def profile(engine, prompts: list[list[int]], new_tokens: int) -> dict:
    import haq.kernels.backends as backends
    from haq.models.adapters import adapter_for
    from haq.runtime.sampling import SamplingParams

    engine.generate_batch(prompts, SamplingParams(max_tokens=4), max_batch=len(prompts))  # warm-up
    clock, handles = Clock(), []
    adapter = adapter_for(engine.model.config)
    for layer in adapter.decoder_layers(engine.model):
        handles += clock.hook(layer.self_attn, "attention") + clock.hook(layer.get_submodule(adapter.moe.router),
                                                                          "router")
    handles += clock.hook(engine.model.lm_head, "lm_head")
    math_forward, run_experts, quantize = engine.store.math.forward, engine.run_experts, backends.quantize_act
    object.__setattr__(engine.store.math, "forward", clock.wrap("expert math", math_forward))
    grouped = engine.store.grouped or []
    for layer in grouped:
        layer.run = clock.wrap("expert math", layer.run)
    engine.run_experts = clock.wrap("dispatch", run_experts)
    backends.quantize_act = clock.wrap("act quant", quantize)
    gen = engine.generator(max_batch=len(prompts))
    for prompt in prompts:
        gen.add(prompt, SamplingParams(max_tokens=new_tokens + 1, ignore_eos=True))
    try:
        while gen.waiting or gen.prefilling is not None:  # prefill, not timed
            gen.step()
        clock.on, steps, start = True, 0, time.perf_counter()
        while gen.has_work:
            gen.step()
            steps += 1
        total = time.perf_counter() - start
    finally:
        object.__setattr__(engine.store.math, "forward", math_forward)
        for layer in grouped:
            del layer.run  # back to the class's method
        engine.run_experts, backends.quantize_act = run_experts, quantize
        for handle in handles:
            handle.remove()
    s = clock.seconds
    s["dispatch"] -= s["expert math"]  # run_experts' own work around the expert calls
    s["other"] = total - sum(s[p] for p in PARTS if p not in ("other", "act quant"))
    return {"ms_per_step": {p: 1e3 * s[p] / steps for p in PARTS}, "step_ms": 1e3 * total / steps,
            "decode_tokens_per_s": steps * len(prompts) / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", action="store_true", required=True, help="the decode-step breakdown")
    parser.add_argument("--model", default="smollm2-8x135m")
    parser.add_argument("--int8", help="the int8 haq checkpoint of --model (haq quantize ... -o DIR)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="engine-profile", help="results file name under bench/results/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from haq.api import build_engine, profile_trace_for
    from haq.data.windows import eval_windows
    from haq.loading import load_model
    from haq.runtime.hardware import load_profile

    rows = []
    for weights, ref in [("fp32", args.model)] + ([("int8", args.int8)] if args.int8 else []):
        model, tokenizer, _ = load_model(ref)
        trace = profile_trace_for(model, tokenizer, str(ref), windows=2, seqlen=128)
        engine = build_engine(model, budget_bytes=0, hardware=load_profile("laptop"), policy="all-cpu", profile=trace)
        windows = eval_windows("wiki-offline", tokenizer, seqlen=64, max_windows=max(args.batches))
        for batch in args.batches:
            result = profile(engine, windows[:batch].tolist(), args.new_tokens)
            row = {"model": args.model, "weights": weights, "batch": batch, "step_ms": result["step_ms"],
                   **{f"{p}_ms": v for p, v in result["ms_per_step"].items()},
                   "decode_tok_s": result["decode_tokens_per_s"], "load": round(os.getloadavg()[0], 2)}
            rows.append(row)
            print(row, flush=True)
        engine.close()
    columns = ["model", "weights", "batch", "step_ms"] + [f"{p}_ms" for p in PARTS] + ["decode_tok_s", "load"]
    md = (f"# Engine decode profile ({machine()['cpu']}, git {git_rev()})\n\n"
          f"`python bench/engine.py --profile --int8 CKPT`: ms per decode step by part, budget 0 (every expert on the "
          f"CPU, policy all-cpu), {args.threads} thread(s), {args.new_tokens} steps after a 64-token prompt per "
          "sequence. `act quant` overlaps attention and expert math (it runs inside them).\n\n"
          + md_table(rows, columns))
    write_results(args.name, {"machine": machine(), "git": git_rev(), "rows": rows}, md)


if __name__ == "__main__":
    main()
