"""The GPU int8 check of issue 12, one short script for a lent machine (<= 5 minutes on an H200):

1. kernels: a Mixtral expert's shape (K = 4096 -> N = 14336, and its down projection 14336 -> 4096)
   at M = 1, 16, 128, 512: bf16 ``F.linear`` against haq's int8 paths: the Triton fused W8A8
   kernel (quantize + int8 GEMM + rescale), the Triton weight-only kernel (int8 weights, bf16
   math), and the ``int_mm`` backend (PyTorch ops around ``torch._int_mm``). Median of CUDA-event
   timings; exactness of every int8 path checked against the float backend first.
2. engine: the bundled tiny-mixtral, bf16 experts against int8 (RTN) at the same device bytes
   (the budget the int8 experts need in full), decode tokens/s, on each int8 backend; then each
   with every expert resident as the engine's static step (haq.runtime.resident, a CUDA graph).
3. graphed: tiny-mixtral with every weight on the GPU, the static decode step
   (haq.runtime.graphed_decode) eager and replayed from a CUDA graph, bf16 against int8.

Writes OUT/kernels-GPU-int8 and OUT/engine-GPU-int8 (.json and .md; the graphed rows in the
engine's; GPU: h200, h100, ...; OUT: --out, default bench/results). `--smoke` runs tiny shapes on
the CPU under TRITON_INTERPRET=1 to check the script.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import failure, gpu_slug, md_table  # noqa: E402


def timed(fn, device, repeats: int) -> float:
    """Median ms of `fn()` (CUDA events on a GPU, wall clock on the CPU)."""
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def kernels(device, shapes, ms, repeats: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from haq.kernels import triton_int8
    from haq.kernels.grid import quantize_weight, weight_scales
    from haq.kernels.int8 import int8_linear

    rows = []
    for K, N in shapes:
        w = torch.randn(N, K, device=device) * 0.02
        scale = weight_scales(w)
        q = quantize_weight(w, scale)
        wb = w.bfloat16()
        for M in ms:
            x = torch.randn(M, K, device=device)
            xb = x.bfloat16()
            exact = int8_linear(x, q.t(), scale, impl="float")
            paths = {"triton w8a8": lambda: triton_int8.w8a8_linear(x, q, scale),
                     "triton weight-only": lambda: triton_int8.weight_only_linear(xb, q, scale),
                     "int_mm": lambda: int8_linear(x, q.t(), scale, impl="int_mm")}
            row = {"K": K, "N": N, "M": M, "bf16_ms": round(timed(lambda: F.linear(xb, wb), device, repeats), 4)}
            for name, fn in paths.items():
                if name != "triton weight-only":
                    row[f"{name} exact"] = bool(torch.equal(fn(), exact))
                ms_ = timed(fn, device, repeats)
                row[f"{name}_ms"] = round(ms_, 4)
                row[f"{name} / bf16 speed"] = round(row["bf16_ms"] / ms_, 3)
            rows.append(row)
            print(row, flush=True)
    return rows


def tiny_mixtral_pair():
    """The bundled tiny-mixtral in float32 and its int8 RTN W8A8 copy."""
    import torch
    from transformers import AutoModelForCausalLM

    from haq.quant.pipeline import quantize_model
    from haq.quant.recipe import Recipe

    folder = ROOT / "haq" / "zoo" / "assets" / "tiny-mixtral"
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    int8 = copy.deepcopy(base)
    quantize_model(int8, Recipe(method="rtn"), torch.randint(0, base.config.vocab_size, (2, 64)), progress=False)
    return base, int8


def engine_runs(device, new_tokens: int, base, int8) -> list[dict]:
    import torch

    from haq.api import build_engine
    from haq.runtime.hardware import load_profile
    from haq.runtime.record import record_trace
    from haq.runtime.resident import static_step
    from haq.runtime.store import extract_experts

    weights, _ = extract_experts(int8.model.layers[0].mlp.experts)
    budget = weights[0].nbytes * len(weights) * base.config.num_hidden_layers  # every int8 expert resident
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, base.config.vocab_size, (1, 32), generator=g)
    profile = record_trace(base, torch.randint(0, base.config.vocab_size, (4, 128), generator=g), "tiny-mixtral",
                           progress=False)
    rows = []
    variants = [("bf16", base, None), ("int8 int_mm", int8, "int_mm"), ("int8 triton", int8, "triton")]
    for name, model, impl in variants[:2] if device.type == "cpu" else variants:  # Triton: CUDA only here
        model = copy.deepcopy(model)
        if name == "bf16":
            model = model.to(torch.bfloat16)
        for module in model.modules():
            if impl is not None and hasattr(module, "impl"):
                module.impl = impl
        row = {"experts": name, "step": "per call", "budget_mib": round(budget / 2**20, 2)}
        try:
            engine = build_engine(model, budget_bytes=budget, hardware=load_profile("laptop"), device=str(device),
                                  policy="lru", profile=profile)
            engine.generate(prompt, max_new_tokens=4)
            tokens, metrics = engine.generate(prompt, max_new_tokens=new_tokens)
            engine.close()
            row.update(decode_tok_s=round(metrics.tokens_per_s, 1), p50_ms=round(metrics.latency_p50_ms, 3),
                       hit_rate=round(metrics.hit_rate, 3), tokens=tokens[:8])
        except Exception as error:  # noqa: BLE001 - recorded, so the other rows still run
            row.update(failure(error))
        rows.append(row)
        print(row, flush=True)
    for name, model in [("bf16", copy.deepcopy(base).to(torch.bfloat16)), ("int8 triton", int8)][:1 if device.type == "cpu" else 2]:
        own, _ = extract_experts(model.model.layers[0].mlp.experts)
        full = own[0].nbytes * len(own) * base.config.num_hidden_layers  # its own experts, all resident
        row = {"experts": name, "step": "static" + (", CUDA graph" if device.type == "cuda" else ", eager"),
               "budget_mib": round(full / 2**20, 2)}
        try:
            engine = build_engine(copy.deepcopy(model), budget_bytes=full, hardware=load_profile("laptop"),
                                  device=str(device), policy="fiddler", profile=profile)
            try:
                with static_step(engine, max_len=prompt.shape[1] + new_tokens + 8) as decoder:
                    row.update(step_rate(decoder, prompt, new_tokens, device))
            finally:
                engine.close()
        except Exception as error:  # noqa: BLE001 - recorded, so the other rows still run
            row.update(failure(error))
        rows.append(row)
        print(row, flush=True)
    return rows


def step_rate(decoder, prompt, new_tokens: int, device) -> dict:
    """Median decode step of a `GraphedDecoder` after a warm-up (where a capture happens), and the greedy tokens."""
    import torch

    token = decoder.prefill(prompt).argmax(-1)
    for _ in range(3):
        token = decoder.step(token).argmax(-1)
    token = decoder.prefill(prompt).argmax(-1)
    steps, tokens = [], [int(token[0])]
    for _ in range(new_tokens - 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        token = decoder.step(token).argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        steps.append(time.perf_counter() - t)
        tokens.append(int(token[0]))
    p50 = statistics.median(steps)
    return {"decode_tok_s": round(1 / p50, 1), "p50_ms": round(p50 * 1e3, 3), "tokens": tokens[:8]}


def graphed_runs(device, new_tokens: int, base, int8) -> list[dict]:
    """Every weight on the device (no engine): the static decode step (haq.runtime.graphed_decode)
    run eagerly and replayed from a CUDA graph; bf16 experts on transformers' grouped_mm, int8
    experts on haq's device MoE (Triton, routing kept on the device). A failure is a row."""
    import torch

    from haq.runtime.graphed_decode import GraphedDecoder

    bf16, int8 = copy.deepcopy(base).to(torch.bfloat16), copy.deepcopy(int8)
    bf16.set_experts_implementation("grouped_mm")
    for module in int8.modules():
        if hasattr(module, "impl"):
            module.impl = "triton"
    prompt = torch.randint(0, base.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    rows = []
    for name, model in [("bf16 grouped_mm", bf16), ("int8 triton", int8)]:
        model = model.to(device)
        for graphs in ((False, True) if device.type == "cuda" else (False,)):
            row = {"weights": name, "step": "CUDA graph" if graphs else "eager"}
            try:
                decoder = GraphedDecoder(model, max_len=prompt.shape[1] + new_tokens + 8, graphs=graphs)
                row.update(step_rate(decoder, prompt, new_tokens, device))
            except Exception as error:  # noqa: BLE001 - recorded, so the other rows still run
                row.update(failure(error))
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton's interpreter)")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from haq.io import atomic_write_text

    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on the GPU machine, or --smoke on the CPU")
    shapes, ms = ([(64, 96)], [1, 16]) if args.smoke else ([(4096, 14336), (14336, 4096)], [1, 16, 128, 512])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke)"
    suffix = "smoke" if args.smoke else gpu_slug(gpu)

    def write(name: str, rows: list[dict], title: str, extra: list = ()) -> None:
        """One file pair (the device returns at most 8 files), written as soon as its part is done."""
        meta = {"gpu": gpu, "torch": torch.__version__, "rows": rows, **{key: r for key, r, _ in extra}}
        atomic_write_text(out / f"{name}.json", json.dumps(meta, indent=1) + "\n")
        atomic_write_text(out / f"{name}.md", f"# {title} ({gpu}, torch {torch.__version__})\n\n"
                          "`python bench/gpu_int8.py` (median of CUDA-event timings, ms).\n\n" + md_table(rows)
                          + "".join(f"\n## {t}\n\n" + md_table(r) for _, r, t in extra if r))
        print(f"wrote {out / name}.json and .md", flush=True)

    try:
        krows = kernels(device, shapes, ms, 3 if args.smoke else args.repeats)
    except Exception as error:  # noqa: BLE001 - recorded; the engine parts still run
        krows = [failure(error)]
    write(f"kernels-{suffix}-int8", krows, "int8 kernels vs bf16 F.linear")
    engine_title = "engine decode, bf16 vs int8 experts at one budget"
    pair = tiny_mixtral_pair()  # float32 and int8 RTN; each part works on copies
    erows = engine_runs(device, 8 if args.smoke else 32, *pair)
    write(f"engine-{suffix}-int8", erows, engine_title)
    graphed = ("graphed", graphed_runs(device, 8 if args.smoke else 64, *pair),
               "The static decode step, eager and from a CUDA graph (every weight resident, no engine)")
    write(f"engine-{suffix}-int8", erows, engine_title, [graphed])


if __name__ == "__main__":
    main()
