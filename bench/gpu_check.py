"""One short check for a machine with a GPU (also runs with --device cpu): measure the hardware
profile there, run the engine on the device at two budgets for the bundled tiny-mixtral (float
experts, and int8 after RTN), compare its greedy tokens with the CPU run, and the simulator's
predicted decode latency with the measured one. Writes OUT/gpu_check.json and .md (OUT defaults
to bench/results). Needs no dataset package: the prompt and profile text come from --text.
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

from haq.io import atomic_write_text  # noqa: E402

MODEL_DIR = ROOT / "haq" / "zoo" / "assets" / "tiny-mixtral"


def windows_from_text(tokenizer, text: str, n: int, seqlen: int) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < n * seqlen:
        raise SystemExit(f"--text has {ids.numel()} tokens, need {n * seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def run(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from haq.quant.pipeline import quantize_model
    from haq.quant.recipe import Recipe
    from haq.api import build_engine
    from haq.runtime.profile_hw import measure_overhead_s_per_layer, profile_hardware
    from haq.runtime.record import record_trace
    from haq.runtime.store import extract_experts
    from haq.sim.tuning import simulate

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    text = Path(args.text).read_text() if args.text else " ".join(["The history of science and art."] * 2000)
    data = windows_from_text(tokenizer, text, 9, 256)
    prompt, profile_ids = data[0, :64][None], data[1:]
    results = {"device": args.device, "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "runs": []}
    for variant in ("fp32", "int8-rtn"):
        model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
        if variant == "int8-rtn":
            quantize_model(model, Recipe(method="rtn"), profile_ids[:2], progress=False)
        profile = record_trace(model, profile_ids, "tiny-mixtral", progress=False)
        weights, math = extract_experts(model.model.layers[0].mlp.experts)
        start = time.perf_counter()
        hardware = profile_hardware(weights[0], math, device=args.device)
        results[f"profile_{variant}"] = hardware.to_dict()
        print(f"{variant}: profiled in {time.perf_counter() - start:.1f}s", flush=True)
        total = weights[0].nbytes * len(weights) * model.config.num_hidden_layers
        cpu_engine = build_engine(copy.deepcopy(model), budget_bytes=0, hardware=hardware, policy="all-cpu",
                            profile=profile, device="cpu")
        cpu_tokens, _ = cpu_engine.generate(prompt, args.new_tokens)
        cpu_engine.close()
        for pct in args.budgets:
            engine = build_engine(copy.deepcopy(model), budget_bytes=total * pct // 100, hardware=hardware, policy="haq",
                            profile=profile, device=args.device)
            engine.generate(prompt, 4)  # warm-up: CUDA context, kernels, caches
            overhead_s = measure_overhead_s_per_layer(engine, prompt)  # non-expert work + dispatch
            tokens, metrics = engine.generate(prompt, args.new_tokens)
            trace = engine.last_trace("tiny-mixtral")
            engine.close()
            predicted = simulate(trace, hardware, [total * pct // 100], weights[0].nbytes, ["haq"], profile_trace=profile,
                                 prefill_tokens=prompt.shape[1], pin_share=engine.policy_ctx.pin_share,
                                 nonexpert_s_per_layer=overhead_s)[0]
            row = {"variant": variant, "budget_pct": pct, "same_tokens_as_cpu": tokens == cpu_tokens,
                   "first_divergence": next((i for i, (a, b) in enumerate(zip(tokens, cpu_tokens)) if a != b), None),
                   "hit_rate": metrics.hit_rate, "cpu_share": metrics.cpu_share,
                   "latency_mean_ms": metrics.latency_mean_ms, "latency_std_ms": metrics.latency_std_ms,
                   "p99_ms": metrics.latency_p99_ms, "tokens_per_s": metrics.tokens_per_s,
                   "device_bytes": metrics.device_bytes, "sim_predicted_ms": predicted.latency_mean_s * 1e3,
                   "sim_error_pct": 100 * (predicted.latency_mean_s * 1e3 / metrics.latency_mean_ms - 1)}
            results["runs"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "device_bytes"}), flush=True)
    return results


def main() -> None:
    # One intra-op thread: the engine runs CPU expert calls on a worker thread beside the main
    # thread, and two multi-threaded ops at once oversubscribe the cores and make timings erratic.
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budgets", type=int, nargs="+", default=[25, 75])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--text", help="a text file for the prompt and the routing profile")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    results = run(args)
    out = Path(args.out)
    atomic_write_text(out / "gpu_check.json", json.dumps(results, indent=2) + "\n")
    lines = [f"# GPU check ({results['gpu'] or 'no GPU'}, device {results['device']}, torch {results['torch']})", "",
             "| variant | budget % | same tokens as CPU | hit rate | CPU share | mean ms | std ms | p99 ms | tok/s | "
             "sim ms | sim error % |", "|" + "---|" * 11]
    for r in results["runs"]:
        lines.append(f"| {r['variant']} | {r['budget_pct']} | {r['same_tokens_as_cpu']} | {r['hit_rate']:.3f} | "
                     f"{r['cpu_share']:.3f} | {r['latency_mean_ms']:.2f} | {r['latency_std_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {r['tokens_per_s']:.1f} | {r['sim_predicted_ms']:.2f} | "
                     f"{r['sim_error_pct']:+.1f} |")
    atomic_write_text(out / "gpu_check.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
