"""Engine decode profile: where a decode step's time goes. Writes bench/results/engine-profile.json
and engine-profile.md (`--name` for another file; engine-profile-before.* is this profile of the
engine before the issue-12 work, commit 611b616).

`--moe-layer --int8 CKPT`: every MoE layer of the checkpoint on T random tokens (random routing), the
grouped kernel (`haq.kernels.grouped_moe`, the engine's CPU path) against the experts call by call on
the "auto" backends, interleaved, medians: why the engine runs prefill chunks grouped too.

`--profile`: a warm engine decodes with wall-clock timers around the parts
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
and 8, budget 0. An int8 checkpoint decodes in one kernel call (haq.runtime.native_decode): its
parts are timed inside the kernel (`STEP_PARTS`: its "other" is norms, residuals and the q/k/v
input's quantization; routing is "router"; there is no Python dispatch), and the Python around
it (embedding, rotary table, sampling, the cache bookkeeping) is added to "other".
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
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
    from haq.runtime.native_decode import STEP_PARTS
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
    native = np.zeros(len(STEP_PARTS) + 1)
    if gen.native is not None:
        step = gen.native.step
        gen.native.step = lambda *a, **k: step(*a, **k, seconds=native if clock.on else None)
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
    for part, seconds in zip(STEP_PARTS, native):
        s[part] += seconds
    s["dispatch"] -= s["expert math"] - native[STEP_PARTS.index("expert math")]  # run_experts' own work
    s["other"] = total - sum(s[p] for p in PARTS if p not in ("other", "act quant"))
    return {"ms_per_step": {p: 1e3 * s[p] / steps for p in PARTS}, "step_ms": 1e3 * total / steps,
            "decode_tokens_per_s": steps * len(prompts) / total}


def greedy_whole_prefix(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy tokens from whole-prefix forwards: no cache, nothing shared with the engine."""
    outs = []
    with torch.no_grad():
        for prompt in prompts:
            ids, out = torch.tensor([prompt]), []
            for _ in range(new_tokens):
                token = int(model(ids).logits[0, -1].argmax())
                out.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            outs.append(out)
    return outs


def fake_quant_tokens(model_ref: str, recipe, prompts: list[list[int]], new_tokens: int
                      ) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens of the float model with every quantized linear and expert fake-quantized
    (quantize-dequantize weights and activations, float GEMMs): the reference an int8 checkpoint
    of `recipe` (RTN: the same integer levels) must reproduce; and, from one forward over prompt +
    those tokens, each position's margin: the chosen token's logit minus the best other one."""
    from contextlib import ExitStack

    from haq.loading import load_model
    from haq.models.adapters import adapter_for
    from haq.quant.fake_quant import fake_quantized

    model, _, _ = load_model(model_ref)
    adapter = adapter_for(model.config)
    with ExitStack() as stack, torch.no_grad():
        for i, layer in enumerate(adapter.decoder_layers(model)):
            stack.enter_context(fake_quantized(layer, adapter.layer_spec(model.config, i), recipe))
        outs = greedy_whole_prefix(model, prompts, new_tokens)
        margins = []
        for prompt, out in zip(prompts, outs):
            logits = model(torch.tensor([prompt + out])).logits[0, len(prompt) - 1:-1].float()
            chosen = logits[torch.arange(len(out)), torch.tensor(out)]
            logits[torch.arange(len(out)), torch.tensor(out)] = float("-inf")
            margins.append((chosen - logits.max(dim=1).values).tolist())
    return outs, margins


def teacher_forced(engine, prompts: list[list[int]], references: list[list[int]]) -> list[list[bool]]:
    """The engine's greedy choice at each position when its input is always the reference's token
    (the sampled token is replaced before the next decode step): agreement without the compounding
    of free-running decoding, where one near-tie flip changes every later token."""
    from haq.runtime.sampling import SamplingParams

    agree = []
    for prompt, ref in zip(prompts, references):
        gen = engine.generator(max_batch=1)
        seq_id = gen.add(prompt, SamplingParams(max_tokens=len(ref), ignore_eos=True))
        same = []
        while gen.has_work:
            for event in gen.step():
                same.append(event.token == ref[event.index])
                for seq in gen.running:
                    if seq.id == seq_id:
                        seq.tokens[-1] = ref[event.index]
        agree.append(same)
    return agree


def plain_tokens(checkpoint: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy tokens of the same int8 checkpoint run plainly: HF's forward over the whole prefix,
    the exact float-GEMM int8 backend, no engine, no native kernels (the same integers)."""
    from haq.loading import load_model

    model, _, _ = load_model(checkpoint, int8_backend="float")
    return greedy_whole_prefix(model, prompts, new_tokens)


def hf_cached_tokens(checkpoint: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """The plain run again, but decoding with HF's own KV cache and attention (no haq decode path):
    how far greedy W8A8 tokens survive a change of float schedule that is not haq's."""
    from haq.loading import load_model

    model, _, _ = load_model(checkpoint, int8_backend="float")
    outs = []
    with torch.no_grad():
        for prompt in prompts:
            out = model(torch.tensor([prompt]), use_cache=True)
            tokens = [int(out.logits[0, -1].argmax())]
            for _ in range(new_tokens - 1):
                out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
                tokens.append(int(out.logits[0, -1].argmax()))
            outs.append(tokens)
    return outs


def check_tokens(args) -> None:
    """The engine on the int8 RTN checkpoint (budget 0: the native kernels, grouped experts, fused
    inputs, decode attention) against the fake-quant float reference, greedy, several prompts."""
    from haq.api import build_engine, profile_trace_for
    from haq.data.windows import eval_windows
    from haq.loading import load_model
    from haq.quant.recipe import Recipe
    from haq.runtime.hardware import load_profile

    meta = json.loads((Path(args.int8) / "haq_config.json").read_text())
    recipe = Recipe.from_dict(meta["recipe"])
    if recipe.method != "rtn":
        raise SystemExit("--check-tokens needs an RTN checkpoint (its levels follow from the float weights alone)")
    model, tokenizer, _ = load_model(args.int8)
    engine = build_engine(model, budget_bytes=0, hardware=load_profile("laptop"), policy="all-cpu",
                          profile=profile_trace_for(model, tokenizer, args.int8, windows=2, seqlen=128))
    prompts = eval_windows("wiki-offline", tokenizer, seqlen=32, max_windows=args.prompts).tolist()
    new_tokens = args.new_tokens or 32
    outputs = [engine.generate(torch.tensor(prompt), max_new_tokens=new_tokens)[0] for prompt in prompts]
    fakes, margins = fake_quant_tokens(args.model, recipe, prompts, new_tokens)
    forced = teacher_forced(engine, prompts, fakes)
    engine.close()
    rows = []
    references = zip(fakes, margins, forced, plain_tokens(args.int8, prompts, new_tokens),
                     hf_cached_tokens(args.int8, prompts, new_tokens))
    for i, (tokens, (fake, margin, same, plain, hf_cached)) in enumerate(zip(outputs, references)):
        def first(a, b):
            return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), "-")
        differ = [m for m, ok in zip(margin, same) if not ok]
        rows.append({"prompt": i, "tokens": len(tokens), "engine = fake-quant": tokens == fake,
                     "first difference": first(tokens, fake),
                     "teacher-forced agreement": f"{sum(same)}/{len(same)}",
                     "reference margin where they differ": ", ".join(f"{m:.3f}" for m in differ) or "-",
                     "smallest reference margin": round(min(margin), 3),
                     "engine = plain int8": tokens == plain,
                     "first difference ": first(tokens, plain), "HF cached = plain int8": hf_cached == plain,
                     "first difference  ": first(hf_cached, plain)})
        print(rows[-1], flush=True)
    md = (f"# Engine greedy tokens vs the fake-quant reference ({machine()['cpu']}, git {git_rev()})\n\n"
          f"`python bench/engine.py --check-tokens --int8 CKPT`: {args.model} int8 RTN W8A8 in the engine (budget 0, "
          f"every expert on the CPU) against (a) the float model with fake-quantized weights and activations and "
          f"(b) the same checkpoint run plainly (HF forward over the whole prefix, the exact float-GEMM int8 "
          f"backend, no engine or native kernels); and (c) that plain run against itself decoded with HF's own "
          f"KV cache and attention: W8A8 with per-token activation scales is discontinuous (a 1-ulp change "
          f"of an activation can move it to the next level), so any change of float schedule, haq's or HF's, "
          f"eventually changes a greedy token. Teacher-forced: the engine fed the fake-quant reference's own "
          f"tokens, its greedy choice compared position by position; a margin is the reference's chosen logit "
          f"minus its best other logit at that position (one forward over prompt + tokens); "
          f"{args.prompts} wiki-offline test prompts of 32 tokens, {new_tokens} greedy tokens each.\n\n"
          + md_table(rows, list(rows[0])))
    write_results("engine-tokens", {"machine": machine(), "git": git_rev(), "rows": rows}, md)


def moe_layer(args) -> None:
    from haq.kernels.experts import Int8Experts
    from haq.kernels.grouped_moe import GroupedExperts
    from haq.kernels.moe import route
    from haq.loading import load_model

    if not args.int8:
        raise SystemExit("--moe-layer needs --int8 CKPT (an int8 haq checkpoint of a MoE model)")
    model, _, _ = load_model(args.int8)
    experts = [m for m in model.modules() if isinstance(m, Int8Experts)]
    runnable = [GroupedExperts.supports(m.act_fn, m.act_bits, m.act_mode, m.gate_up_in_scale is not None,
                                        m.gate_up_q.device) for m in experts]
    if not experts or not all(runnable):
        raise SystemExit(f"{args.int8}: the grouped kernel does not run these experts (dynamic per-token W8A8 "
                         "SiLU experts on the CPU)")
    grouped = [GroupedExperts.of_int8_experts(m) for m in experts]
    E, K, H = experts[0].num_experts, model.config.num_experts_per_tok, experts[0].hidden_dim
    gen = torch.Generator().manual_seed(0)
    rows = []
    for T in args.tokens:
        x = torch.randn(T, H, generator=gen)
        index = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
        weights = torch.softmax(torch.randn(T, K, generator=gen), -1)
        calls = route(index)
        ways = {"grouped": lambda: [g.run(x, calls, weights) for g in grouped],
                "call by call": lambda: [m(x, index, weights) for m in experts]}
        times: dict[str, list[float]] = {w: [] for w in ways}
        for _ in range(args.repeats):
            for way, fn in ways.items():  # interleaved
                fn()  # warm: the weights in cache as far as they fit, the allocator
                start = time.perf_counter()
                fn()
                times[way].append((time.perf_counter() - start) * 1e3)
        for g, m in zip(grouped, experts):  # the same math: integers equal, SiLU's expf within an ulp
            ref = m(x, index, weights)
            torch.testing.assert_close(g.run(x, calls, weights), ref, rtol=0, atol=2e-3 * ref.abs().max().item())
        ms = {way: float(np.median(t)) for way, t in times.items()}
        rows.append({"tokens": T, "layers": len(experts), "grouped_ms": round(ms["grouped"], 2),
                     "call_by_call_ms": round(ms["call by call"], 2),
                     "speedup": round(ms["call by call"] / ms["grouped"], 3), "load": round(os.getloadavg()[0], 2)})
        print(rows[-1], flush=True)
    md = (f"# A checkpoint's MoE layers: grouped kernel vs call by call ({machine()['cpu']}, git {git_rev()})\n\n"
          f"`python bench/engine.py --moe-layer --int8 {args.int8}`: all {len(experts)} MoE layers on T random tokens, "
          f"random top-{K} routing, {args.threads} thread(s), medians of {args.repeats} interleaved runs.\n\n"
          + md_table(rows))
    write_results(args.name, {"machine": machine(), "git": git_rev(), "rows": rows}, md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--profile", action="store_true", help="the decode-step breakdown")
    mode.add_argument("--moe-layer", action="store_true", help="grouped MoE kernel vs call by call, by tokens")
    mode.add_argument("--check-tokens", action="store_true",
                      help="greedy tokens of the int8 RTN checkpoint vs the fake-quant reference")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--model", default="smollm2-8x135m")
    parser.add_argument("--int8", help="the int8 haq checkpoint of --model (haq quantize ... -o DIR)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=None, help="decode steps (profile 16, check 32)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 16, 64, 256, 512], help="--moe-layer's T")
    parser.add_argument("--repeats", type=int, default=5, help="--moe-layer's runs per T and way")
    parser.add_argument("--name", help="results file name under bench/results/ (default: engine-profile, "
                                       "engine-moe-layer)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.check_tokens:
        return check_tokens(args)
    if args.moe_layer:
        args.name = args.name or "engine-moe-layer"
        return moe_layer(args)
    args.name = args.name or "engine-profile"
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
            result = profile(engine, windows[:batch].tolist(), args.new_tokens or 16)
            row = {"model": args.model, "weights": weights, "batch": batch, "step_ms": result["step_ms"],
                   **{f"{p}_ms": v for p, v in result["ms_per_step"].items()},
                   "decode_tok_s": result["decode_tokens_per_s"], "load": round(os.getloadavg()[0], 2)}
            rows.append(row)
            print(row, flush=True)
        engine.close()
    columns = ["model", "weights", "batch", "step_ms"] + [f"{p}_ms" for p in PARTS] + ["decode_tok_s", "load"]
    md = (f"# Engine decode profile ({machine()['cpu']}, git {git_rev()})\n\n"
          f"`python bench/engine.py --profile --int8 CKPT`: ms per decode step by part, budget 0 (every expert on the "
          f"CPU, policy all-cpu), {args.threads} thread(s), {args.new_tokens or 16} steps after a 64-token prompt per "
          "sequence. `act quant` overlaps attention and expert math (it runs inside them).\n\n"
          + md_table(rows, columns))
    write_results(args.name, {"machine": machine(), "git": git_rev(), "rows": rows}, md)


if __name__ == "__main__":
    main()
