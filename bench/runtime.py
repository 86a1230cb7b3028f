"""Runtime benchmark. Writes bench/results/runtime.json and runtime.md.

(a) engine: the real offloading engine on this machine (CPU; the "device" cache is a separate
    memory pool) for smollm2-8x135m and tiny-mixtral at budgets 0/25/50/75/100% of expert bytes:
    greedy tokens compared with the plain model's, and the run's metrics;
(b) sim: the simulator on routing traces recorded from those models (wiki-offline test) and on the
    synthetic Mixtral-8x7B-scale trace (labelled synthetic), RTX 4090 preset, budgets 25/50/75%,
    every policy;
(c) sim_vs_engine: the simulator replaying the engine's own routing with the hardware profile
    measured on this machine, predicted vs measured mean decode latency.
"""
from __future__ import annotations

import argparse
import copy

import torch

from common import machine, md_table, write_results

MODELS = ["smollm2-8x135m", "tiny-mixtral"]
POLICIES = ["all-cpu", "transfer-always", "lru", "fiddler", "llamacpp", "haq", "belady"]


def int8_expert_bytes(config) -> tuple[int, int]:
    """(bytes, flops per token) of one expert stored int8 with float32 per-channel scales."""
    H, I = config.hidden_size, config.intermediate_size
    params = 3 * H * I
    return params + 4 * (2 * I + H), 2 * params


@torch.no_grad()
def greedy(model, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Plain greedy decoding with the KV cache, no stop token (the engine does not stop either)."""
    out = model(ids, use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    for _ in range(new_tokens - 1):
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def sim_row(r, trace_name: str, synthetic: bool, hardware: str) -> dict:
    return {"trace": trace_name, "synthetic": synthetic, "hardware": hardware, "budget_pct": round(100 * r.budget_frac),
            "policy": r.policy, "hit_rate": r.hit_rate, "layer_hit_std": r.layer_hit_std, "cpu_share": r.cpu_share,
            "bytes_per_token": r.bytes_moved_per_token, "latency_mean_ms": r.latency_mean_s * 1e3,
            "latency_std_ms": r.latency_std_s * 1e3, "p99_ms": r.latency_p99_s * 1e3, "tokens_per_s": r.tokens_per_s,
            "device_bytes": r.device_bytes}


def run_model(name: str, budgets: list[int], new_tokens: int, sim_budgets: list[int]) -> tuple[list, list, list]:
    from haq import zoo
    from haq.data.windows import eval_windows
    from haq.loading import load_model
    from haq.api import profile_trace_for
    from haq.api import build_engine
    from haq.runtime.hardware import load_profile
    from haq.runtime.profile_hw import measure_overhead_s_per_layer, profile_hardware
    from haq.runtime.record import record_trace
    from haq.runtime.store import extract_experts
    from haq.sim.tuning import simulate

    zoo.build(name)
    model, tokenizer, _ = load_model(name)
    test = eval_windows("wiki-offline", tokenizer, seqlen=256, max_windows=8)
    prompt = test[0, :64][None]
    expected = greedy(model, prompt, new_tokens)
    profile = profile_trace_for(model, tokenizer, name)
    weights, math = extract_experts(model.model.layers[0].mlp.experts)
    measured = profile_hardware(weights[0], math, device="cpu")
    total = weights[0].nbytes * len(weights) * model.config.num_hidden_layers
    engine_rows, compare_rows = [], []
    for pct in budgets:
        engine = build_engine(copy.deepcopy(model), budget_bytes=total * pct // 100, hardware=measured, policy="haq",
                        profile=profile)
        engine.generate(prompt, max_new_tokens=4)  # warm-up: first-touch page faults, allocator, caches
        overhead_s = measure_overhead_s_per_layer(engine, prompt)  # non-expert work + the engine's dispatch
        tokens, m = engine.generate(prompt, max_new_tokens=new_tokens)
        trace = engine.last_trace(name)
        engine.close()
        row = {"model": name, "budget_pct": pct, "identical": tokens == expected, "hit_rate": m.hit_rate,
               "layer_hit_std": m.layer_hit_std, "cpu_share": m.cpu_share, "latency_mean_ms": m.latency_mean_ms,
               "latency_std_ms": m.latency_std_ms, "p99_ms": m.latency_p99_ms, "ttft_ms": m.ttft_ms,
               "tokens_per_s": m.tokens_per_s, "device_bytes": m.device_bytes["total"],
               "expert_bytes_on_device": m.device_bytes["experts_peak"],
               "bytes_moved_per_token": m.bytes_moved_per_token}
        engine_rows.append(row)
        print(row, flush=True)
        predicted = simulate(trace, measured, [total * pct // 100], weights[0].nbytes, ["haq"], profile_trace=profile,
                             prefill_tokens=prompt.shape[1], nonexpert_s_per_layer=overhead_s,
                             pin_share=engine.policy_ctx.pin_share,  # the policy exactly as the engine ran it
                             flops_per_token=2.0 * (weights[0].gate_up.numel() + weights[0].down.numel()))[0]
        compare_rows.append({"model": name, "budget_pct": pct, "predicted_ms": predicted.latency_mean_s * 1e3,
                             "measured_ms": m.latency_mean_ms,
                             "error_pct": 100 * (predicted.latency_mean_s * 1e3 / m.latency_mean_ms - 1)})
        print(compare_rows[-1], flush=True)
    trace = record_trace(model, test, name, source="hf-hooks on wiki-offline test", progress=False)
    expert_bytes, flops = int8_expert_bytes(model.config)
    model_total = expert_bytes * len(weights) * model.config.num_hidden_layers
    sims = simulate(trace, load_profile("rtx4090-pcie4"), [model_total * p // 100 for p in sim_budgets], expert_bytes,
                    POLICIES, flops_per_token=flops, profile_trace=profile)
    sim_rows = [sim_row(r, name, False, "rtx4090-pcie4") for r in sims]
    return engine_rows, sim_rows, compare_rows


def synthetic_rows(sim_budgets: list[int]) -> list[dict]:
    from haq.runtime.hardware import load_profile
    from haq.runtime.synthetic import (MIXTRAL_EXPERT_BYTES, MIXTRAL_EXPERT_FLOPS, MIXTRAL_NONEXPERT_BYTES_PER_LAYER,
                                       generate_synthetic_trace, load_fiddler_ranking)
    from haq.sim.tuning import simulate

    trace = generate_synthetic_trace(num_sequences=16, seq_len=256, seed=0)
    total = MIXTRAL_EXPERT_BYTES * trace.meta.layers * trace.meta.num_experts
    rows = simulate(trace, load_profile("rtx4090-pcie4"), [total * p // 100 for p in sim_budgets],
                    MIXTRAL_EXPERT_BYTES, POLICIES + ["fiddler-list"], flops_per_token=MIXTRAL_EXPERT_FLOPS,
                    nonexpert_bytes_per_layer=MIXTRAL_NONEXPERT_BYTES_PER_LAYER, ranking=load_fiddler_ranking())
    return [sim_row(r, "synthetic-mixtral-8x7b", True, "rtx4090-pcie4") for r in rows]


def main() -> None:
    # One intra-op thread: on 2 cores, multi-threaded small GEMMs make decode timings erratic; the
    # profile, the engine and the simulator's prediction all see the same single thread.
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--budgets", type=int, nargs="+", default=[0, 25, 50, 75, 100])
    parser.add_argument("--sim-budgets", type=int, nargs="+", default=[25, 50, 75])
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    engine, sim, compare = [], [], []
    for name in args.models:
        e, s, c = run_model(name, args.budgets, args.new_tokens, args.sim_budgets)
        engine += e
        sim += s
        compare += c
    sim += synthetic_rows(args.sim_budgets)
    md = ("# Runtime\n\n## (a) Engine on this CPU (policy haq, measured hardware profile; "
          f"{args.new_tokens} new tokens after a 64-token wiki-offline prompt)\n\n"
          + md_table(engine, ["model", "budget_pct", "identical", "hit_rate", "layer_hit_std", "cpu_share",
                              "latency_mean_ms", "latency_std_ms", "p99_ms", "ttft_ms", "tokens_per_s",
                              "expert_bytes_on_device", "device_bytes"])
          + "\n## (b) Simulator, RTX 4090 + PCIe 4.0 preset (int8 experts)\n\n"
          + md_table(sim, ["trace", "synthetic", "budget_pct", "policy", "hit_rate", "layer_hit_std", "cpu_share",
                           "bytes_per_token", "latency_mean_ms", "latency_std_ms", "p99_ms", "tokens_per_s",
                           "device_bytes"])
          + "\n## (c) Simulator vs engine on this CPU (same measured profile, the engine's own routing)\n\n"
          + md_table(compare, ["model", "budget_pct", "predicted_ms", "measured_ms", "error_pct"]))
    write_results("runtime", {"machine": machine(), "engine": engine, "sim": sim, "sim_vs_engine": compare}, md)


if __name__ == "__main__":
    main()
