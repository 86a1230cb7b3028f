"""Placement policies with prefetch, in the simulator. Writes bench/results/policy.{json,md} and plots.

(a) decode at batch 1, RTX 4090 + PCIe 4.0 preset, budgets 10/25/50% of expert bytes, on
    - the synthetic Mixtral-8x7B-scale trace (int8 Mixtral experts; its cross-layer structure is
      the generator's assumption),
    - routing recorded from smollm2-8x135m (30 MoE layers, 8 experts, top-2: Mixtral's shape),
      costed as Mixtral int8 experts ("at Mixtral size") and as its own int8 experts,
    - routing recorded from tiny-mixtral (its own int8 experts);
    every real policy, haq without prefetch and with each prediction source (profile paths, the
    recorded pre-gate), and haq with the oracle lookahead (the replayed routing itself: the
    ceiling of any prefetch, not a runnable policy). ratio_vs_best_other: haq's decode tokens/s
    over the best of lru, fiddler, llamacpp at that budget;
(b) prediction accuracy per model: the share of the experts a layer calls that the pre-gate (its
    router on the MoE input d layers earlier) or the path statistics (the sets at l-d, l-d-1,
    from the profile half) had in their top-k, d = 1 and 2;
(c) prefill (512 and 2048 prompt tokens: TTFT, prefill tokens/s) and decode at batch 1/4/16, the
    synthetic Mixtral trace, each policy's own rule for large calls (llamacpp: copy when >= 32 tokens;
    fiddler: linear CPU cost; haq: the predictor's list scheduling);
(d) replay speed: expert calls replayed per second per policy on a synthetic trace of 64 experts,
    top-6, 26 layers (DeepSeek-V2-Lite's shape).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from common import RESULTS, machine, md_table, write_results

POLICIES = ["lru", "fiddler", "llamacpp", "haq"]
OTHERS = ("lru", "fiddler", "llamacpp")
SOURCES = ["off", "path", "pregate", "oracle"]
PRESET = "rtx4090-pcie4"


def int8_expert(config) -> tuple[int, float]:
    """(bytes, flops per token) of one expert stored int8 with float32 per-channel scales."""
    H, I = config.hidden_size, config.intermediate_size
    return 3 * H * I + 4 * (2 * I + H), 6.0 * H * I


def recorded(name: str, windows: int):
    from haq import zoo
    from haq.data.windows import eval_windows
    from haq.loading import load_model
    from haq.runtime.record import record_trace

    zoo.build(name)
    model, tokenizer, _ = load_model(name)
    test = eval_windows("wiki-offline", tokenizer, seqlen=256, max_windows=windows)
    return record_trace(model, test, name, source="hf-hooks on wiki-offline test", progress=False), model.config


def sim_rows(label: str, trace, expert_bytes: int, flops: float, nonexpert: int, budgets: list[int]) -> list[dict]:
    from haq.runtime.hardware import load_profile
    from haq.runtime.trace import split_by_sequence
    from haq.sim.tuning import simulate

    profile, replayed = split_by_sequence(trace)
    total = expert_bytes * trace.meta.layers * trace.meta.num_experts
    sizes = [total * b // 100 for b in budgets]
    hw = load_profile(PRESET)
    rows = []
    for source in SOURCES:
        if source == "pregate" and trace.pregate is None:
            continue
        t0 = time.perf_counter()
        names = POLICIES if source == "off" else ["haq"]
        results = simulate(replayed, hw, sizes, expert_bytes, names, flops_per_token=flops, profile_trace=profile,
                           nonexpert_bytes_per_layer=nonexpert, prefetch=source)
        for r in results:
            name = r.policy if r.policy != "haq" else ("haq" if source == "off" else f"haq+{source}")
            rows.append({"trace": label, "budget_pct": round(100 * r.budget_frac), "policy": name, "detail": r.detail,
                         "tokens_per_s": r.tokens_per_s, "latency_mean_ms": r.latency_mean_s * 1e3,
                         "p99_ms": r.latency_p99_s * 1e3, "hit_rate": r.hit_rate, "layer_hit_std": r.layer_hit_std,
                         "cpu_share": r.cpu_share, "prefetches_per_token": r.prefetches_per_token,
                         "prefetch_used": r.prefetch_used, "_result": r})
        print(f"{label}: prefetch {source} in {time.perf_counter() - t0:.1f} s", flush=True)
    for r in rows:
        best = max(x["tokens_per_s"] for x in rows if x["budget_pct"] == r["budget_pct"] and x["policy"] in OTHERS)
        r["ratio_vs_best_other"] = r["tokens_per_s"] / best
        lru = next(x for x in rows if x["budget_pct"] == r["budget_pct"] and x["policy"] == "lru")
        r["hit_std_vs_lru"] = r["layer_hit_std"] / max(lru["layer_hit_std"], 1e-12)
    return rows


def accuracy_rows(name: str, trace) -> list[dict]:
    from haq.runtime.prefetch import PathPredictor, path_accuracy, pregate_accuracy, pregate_distance
    from haq.runtime.trace import split_by_sequence

    profile, replayed = split_by_sequence(trace)
    rows = []
    for d in (1, 2):
        acc = path_accuracy(PathPredictor.from_trace(profile, d), replayed)[d:]
        rows.append({"model": name, "source": "path", "distance": d, "mean": float(acc.mean()),
                     "min_layer": float(acc.min()), "per_layer": [round(float(a), 3) for a in acc]})
    if trace.pregate is not None:
        d = pregate_distance(trace)
        acc = pregate_accuracy(replayed)[d:]
        rows.append({"model": name, "source": "pregate", "distance": d, "mean": float(acc.mean()),
                     "min_layer": float(acc.min()), "per_layer": [round(float(a), 3) for a in acc]})
    return rows


def batch_rows(budgets: list[int]) -> list[dict]:
    from haq.runtime.hardware import load_profile
    from haq.runtime.synthetic import (MIXTRAL_EXPERT_BYTES, MIXTRAL_EXPERT_FLOPS, MIXTRAL_NONEXPERT_BYTES_PER_LAYER,
                                       generate_synthetic_trace)
    from haq.runtime.trace import split_by_sequence
    from haq.sim.tuning import simulate

    hw = load_profile(PRESET)
    total = MIXTRAL_EXPERT_BYTES * 256
    kw = dict(flops_per_token=MIXTRAL_EXPERT_FLOPS, nonexpert_bytes_per_layer=MIXTRAL_NONEXPERT_BYTES_PER_LAYER)
    rows = []
    for prompt in (512, 2048):
        profile, replayed = split_by_sequence(generate_synthetic_trace(num_sequences=8, seq_len=prompt + 16, seed=1))
        for r in simulate(replayed, hw, [total * b // 100 for b in budgets], MIXTRAL_EXPERT_BYTES, POLICIES,
                          prefill_tokens=prompt, profile_trace=profile, **kw):
            rows.append({"phase": f"prefill {prompt}", "budget_pct": round(100 * r.budget_frac), "policy": r.policy,
                         "ttft_ms": r.ttft_mean_s * 1e3, "prefill_tok_s": r.prefill_tokens_per_s,
                         "cpu_share": r.cpu_share})
        print(f"prefill {prompt} done", flush=True)
    short = generate_synthetic_trace(num_sequences=32, seq_len=64, seed=2)
    for batch in (1, 4, 16):
        profile, replayed = split_by_sequence(short)
        for r in simulate(replayed, hw, [total * b // 100 for b in budgets], MIXTRAL_EXPERT_BYTES, POLICIES,
                          decode_batch=batch, profile_trace=profile, **kw):
            rows.append({"phase": f"decode batch {batch}", "budget_pct": round(100 * r.budget_frac),
                         "policy": r.policy, "decode_tok_s": r.tokens_per_s, "step_ms": r.latency_mean_s * 1e3,
                         "cpu_share": r.cpu_share})
        print(f"decode batch {batch} done", flush=True)
    for r in rows:
        key = "prefill_tok_s" if r["phase"].startswith("prefill") else "decode_tok_s"
        best = max(x[key] for x in rows if x["phase"] == r["phase"] and x["budget_pct"] == r["budget_pct"]
                   and x["policy"] in OTHERS)
        r["ratio_vs_best_other"] = r[key] / best
    return rows


def speed_rows(tokens: int) -> list[dict]:
    """Calls replayed per second on a 64-expert, top-6, 26-layer synthetic trace (replay only: the
    profile statistics and the policy's construction are not timed)."""
    from haq.runtime.hardware import load_profile
    from haq.runtime.placement import profile_statistics
    from haq.runtime.policies import PolicyContext, make_policy
    from haq.runtime.predictor import CostPredictor
    from haq.runtime.synthetic import generate_synthetic_trace
    from haq.runtime.trace import split_by_sequence
    from haq.sim.timeline import lookahead_for, replay_steps, run_policy

    L, E, K = 26, 64, 6
    popularity = np.random.default_rng(0).dirichlet(np.full(E, 0.5), size=L) * 1e4 + 1
    trace = generate_synthetic_trace(num_sequences=4, seq_len=tokens // 2, popularity=popularity, top_k=K, seed=0,
                                     model="synthetic-64x-top6")
    profile, replayed = split_by_sequence(trace)
    expert_bytes = 3 * 2048 * 1408 + 4 * (2 * 1408 + 2048)  # DeepSeek-V2-Lite's routed expert, int8
    predictor = CostPredictor(load_profile(PRESET), expert_bytes, 6.0 * 2048 * 1408)
    stats = profile_statistics(profile)
    steps = replay_steps(replayed)
    calls = sum(len(c) for st in steps for c in st.calls)
    rows = []
    for name, source in (("lru", "off"), ("fiddler", "off"), ("haq", "off"), ("haq", "path")):
        ctx = PolicyContext(budget_bytes=L * E * expert_bytes // 4, expert_bytes=expert_bytes, predictor=predictor,
                            stats=stats, pin_share=0.5, prefetch=source != "off")
        lookahead = lookahead_for(source, profile, replayed)
        policy = make_policy(name, ctx)
        t0 = time.perf_counter()
        run_policy(policy, steps, predictor, L, lookahead=lookahead)
        seconds = time.perf_counter() - t0
        rows.append({"policy": name if source == "off" else f"haq+{source}", "calls": calls, "seconds": seconds,
                     "calls_per_s": calls / seconds})
        print(rows[-1], flush=True)
    return rows


def plots(rows: list[dict]) -> list[str]:
    from haq.sim.plots import plot_latency_cdf

    out = []
    for trace in dict.fromkeys(r["trace"] for r in rows):
        chosen = [r["_result"] for r in rows if r["trace"] == trace and r["policy"] in ("fiddler", "haq", "haq+oracle")
                  + (("haq+pregate",) if "smollm2" in trace else ("haq+path",))]
        for r in rows:
            if r["trace"] == trace:
                r["_result"].policy = r["policy"]
        name = f"policy-latency-cdf-{trace.replace(' ', '-').replace('(', '').replace(')', '')}.png"
        out.append(str(plot_latency_cdf(chosen, RESULTS / name).relative_to(RESULTS)))
    return out


def main() -> None:
    import torch

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--windows", type=int, default=16, help="wiki-offline test windows of 256 tokens per model")
    parser.add_argument("--speed-tokens", type=int, default=1024)
    args = parser.parse_args()
    from haq.runtime.synthetic import (MIXTRAL_EXPERT_BYTES, MIXTRAL_EXPERT_FLOPS, MIXTRAL_NONEXPERT_BYTES_PER_LAYER,
                                       generate_synthetic_trace)

    start = time.perf_counter()
    sims, accuracy = [], []
    synthetic = generate_synthetic_trace(num_sequences=16, seq_len=256, seed=0)
    sims += sim_rows("synthetic Mixtral-8x7B", synthetic, MIXTRAL_EXPERT_BYTES, MIXTRAL_EXPERT_FLOPS,
                     MIXTRAL_NONEXPERT_BYTES_PER_LAYER, args.budgets)
    accuracy += accuracy_rows("synthetic Mixtral-8x7B", synthetic)
    for name in ("smollm2-8x135m", "tiny-mixtral"):
        trace, config = recorded(name, args.windows)
        accuracy += accuracy_rows(name, trace)
        if name == "smollm2-8x135m":
            sims += sim_rows(f"{name} (at Mixtral size)", trace, MIXTRAL_EXPERT_BYTES, MIXTRAL_EXPERT_FLOPS,
                             MIXTRAL_NONEXPERT_BYTES_PER_LAYER, args.budgets)
        nbytes, flops = int8_expert(config)
        sims += sim_rows(name, trace, nbytes, flops, 0, args.budgets)
    figures = plots(sims)
    batch = batch_rows([25])
    speed = speed_rows(args.speed_tokens)
    seconds = time.perf_counter() - start
    sim_cols = ["trace", "budget_pct", "policy", "tokens_per_s", "ratio_vs_best_other", "latency_mean_ms", "p99_ms",
                "hit_rate", "layer_hit_std", "hit_std_vs_lru", "cpu_share", "prefetches_per_token", "prefetch_used",
                "detail"]
    md = (f"# Placement policies and prefetch (simulator, {PRESET} preset)\n\n"
          f"`python bench/policy.py`: {seconds / 60:.1f} min, load average {os.getloadavg()[0]:.2f}. "
          "ratio_vs_best_other: tokens/s over the best of lru, fiddler, llamacpp at the budget. haq+oracle prefetches "
          "with the replayed routing itself: the ceiling of prefetch under this cost model, not a runnable policy.\n\n"
          "## (a) Decode, batch 1\n\n" + md_table(sims, sim_cols)
          + "\n## (b) Prediction accuracy (share of called experts in the predicted top-k; replayed half)\n\n"
          + md_table(accuracy, ["model", "source", "distance", "mean", "min_layer"])
          + "\n## (c) Prefill and batched decode (synthetic Mixtral-8x7B trace, 25% budget)\n\n"
          + md_table(batch, ["phase", "budget_pct", "policy", "ttft_ms", "prefill_tok_s", "decode_tok_s", "step_ms",
                             "cpu_share", "ratio_vs_best_other"])
          + "\n## (d) Replay speed (64 experts, top-6, 26 layers)\n\n"
          + md_table(speed, ["policy", "calls", "seconds", "calls_per_s"])
          + "\nPlots: " + ", ".join(f"`bench/results/{f}`" for f in figures) + "\n")
    for r in sims:
        r.pop("_result")
    write_results("policy", {"machine": machine(), "preset": PRESET, "minutes": round(seconds / 60, 1),
                             "load": os.getloadavg()[0], "decode": sims, "accuracy": accuracy, "batch": batch,
                             "replay_speed": speed}, md)


if __name__ == "__main__":
    main()
