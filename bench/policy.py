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
    fiddler: linear CPU cost; haq: the predictor's list scheduling, with its copies started a layer
    ahead, and "haq, not pipelined": the same tuned shares and prefetch, each layer's copies
    starting with the layer);
(d) replay speed: expert calls replayed per second per policy on a synthetic trace of 64 experts,
    top-6, 26 layers (DeepSeek-V2-Lite's shape);
(e) the memory claim at equal service: FP16 experts all resident (plus FP16 attention) against
    int8 experts with the haq policy at the smallest budget (5% steps) that keeps >= 90% of the
    FP16 all-resident decode tokens/s, and separately prefill tokens/s (512-token prompts).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from common import RESULTS, git_rev, machine, md_table, write_results
from runtime import int8_expert_bytes

POLICIES = ["lru", "fiddler", "llamacpp", "haq"]
OTHERS = ("lru", "fiddler", "llamacpp")
SOURCES = ["off", "path", "pregate", "oracle"]
PRESET = "rtx4090-pcie4"


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
        plain = simulate(replayed, hw, [total * b // 100 for b in budgets], MIXTRAL_EXPERT_BYTES, ["haq"],
                         prefill_tokens=prompt, profile_trace=profile, pipeline=False, **kw)
        for r in plain:
            r.policy = "haq, not pipelined"
        for r in simulate(replayed, hw, [total * b // 100 for b in budgets], MIXTRAL_EXPERT_BYTES, POLICIES,
                          prefill_tokens=prompt, profile_trace=profile, **kw) + plain:
            rows.append({"phase": f"prefill {prompt}", "budget_pct": round(100 * r.budget_frac), "policy": r.policy,
                         "ttft_ms": r.ttft_mean_s * 1e3, "prefill_tok_s": r.prefill_tokens_per_s,
                         "cpu_share": r.cpu_share, "ahead_per_token": r.ahead_per_prefill_token,
                         "device_gib": r.device_bytes / 2**30})
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


def speed_rows(tokens: int, repeats: int = 3) -> list[dict]:
    """Calls replayed per second on a 64-expert, top-6, 26-layer synthetic trace (replay only: the
    profile statistics and the policy's construction are not timed); the policies interleaved
    `repeats` times, the median and the range of the rounds."""
    from haq.runtime.hardware import load_profile
    from haq.runtime.placement import profile_statistics
    from haq.runtime.policies import PolicyContext, make_policy
    from haq.runtime.predictor import CostPredictor
    from haq.runtime.synthetic import generate_synthetic_trace
    from haq.runtime.trace import split_by_sequence
    from haq.sim.lookahead import lookahead_for
    from haq.sim.timeline import replay_steps, run_policy

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
    policies = (("lru", "off"), ("fiddler", "off"), ("haq", "off"), ("haq", "path"))
    seconds: dict[str, list[float]] = {}
    for round_ in range(repeats):
        for name, source in policies:
            ctx = PolicyContext(budget_bytes=L * E * expert_bytes // 4, expert_bytes=expert_bytes,
                                predictor=predictor, stats=stats, pin_share=0.5, prefetch=source != "off")
            lookahead = lookahead_for(source, profile, replayed)
            policy = make_policy(name, ctx)
            t0 = time.perf_counter()
            run_policy(policy, steps, predictor, L, lookahead=lookahead)
            label = name if source == "off" else f"{name}+{source}"
            seconds.setdefault(label, []).append(time.perf_counter() - t0)
            print(f"round {round_ + 1}/{repeats} {label}: {calls / seconds[label][-1]:,.0f} calls/s", flush=True)
    return [{"policy": label, "calls": calls, "seconds": float(np.median(s)),
             "calls_per_s": calls / float(np.median(s)), "calls_per_s_min": calls / max(s),
             "calls_per_s_max": calls / min(s)} for label, s in seconds.items()]


def memory_rows(traces: dict[str, tuple], step: int = 5) -> list[dict]:
    """(e): per trace {label: (trace, int8 expert bytes, flops, int8 non-expert bytes per layer)}."""
    from haq.runtime.hardware import load_profile
    from haq.runtime.trace import split_by_sequence
    from haq.sim.tuning import simulate

    hw = load_profile(PRESET)
    rows = []
    for label, (trace, nbytes, flops, nonexpert) in traces.items():
        profile, replayed = split_by_sequence(trace)
        L, E = trace.meta.layers, trace.meta.num_experts
        params = flops / 2  # one multiply-add per weight
        fp16_bytes, fp16_nonexpert = int(2 * params), 2 * nonexpert
        for phase, prefill in (("decode", 0), ("prefill 512", 512)):
            if prefill and (np.unique(replayed.seq_id, return_counts=True)[1] <= prefill).any():
                continue  # the recorded windows are shorter than the prompt
            key = "tokens_per_s" if not prefill else "prefill_tokens_per_s"
            fp16 = simulate(replayed, hw, [fp16_bytes * L * E], fp16_bytes, ["haq"], flops_per_token=flops,
                            profile_trace=profile, nonexpert_bytes_per_layer=fp16_nonexpert, prefill_tokens=prefill,
                            pin_share=1.0, prefetch="off")[0]
            target = 0.9 * getattr(fp16, key)
            budgets = [nbytes * L * E * pct // 100 for pct in range(step, 101, step)]
            sweep = simulate(replayed, hw, budgets, nbytes, ["haq"], flops_per_token=flops, profile_trace=profile,
                             nonexpert_bytes_per_layer=nonexpert, prefill_tokens=prefill)
            ok = [r for r in sweep if getattr(r, key) >= target]
            best = ok[0] if ok else None
            rows.append({"trace": label, "phase": phase, "fp16_tok_s": getattr(fp16, key),
                         "fp16_device_gib": fp16.device_bytes / 2**30,
                         "int8_budget_pct": round(100 * best.budget_frac) if best else None,
                         "int8_tok_s": getattr(best, key) if best else None,
                         "int8_device_gib": best.device_bytes / 2**30 if best else None,
                         "device_bytes_saved_pct": 100 * (1 - best.device_bytes / fp16.device_bytes) if best else None,
                         "curve": [(round(100 * r.budget_frac), getattr(r, key), r.device_bytes) for r in sweep]})
            print({k: v for k, v in rows[-1].items() if k != "curve"}, flush=True)
    return rows


def plot_memory(rows: list[dict]) -> str:
    """Tokens/s against device bytes: haq's int8 budget sweep per trace and phase, FP16 all resident as a point."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0 * len(rows) // 2 + 3, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for r in rows:
        _, tok_s, dev = zip(*r["curve"])
        line, = ax.plot(np.array(dev) / 2**30, tok_s, marker=".", label=f"{r['trace']}, {r['phase']}: int8 haq")
        ax.scatter([r["fp16_device_gib"]], [r["fp16_tok_s"]], marker="*", s=120, color=line.get_color())
    ax.set_xlabel("device GiB (experts + attention)")
    ax.set_ylabel("tokens/s")
    ax.set_yscale("log")
    ax.set_title("int8 experts under the haq policy vs FP16 all resident (star)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = RESULTS / "policy-memory.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path.name


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


def summary(payload: dict) -> str:
    """The README's short version of policy.md: ratios at the budgets that matter, accuracy, speed, memory."""
    decode, lines = payload["decode"], []
    for trace in dict.fromkeys(r["trace"] for r in decode):
        for pct in (10, 25):
            rows = {r["policy"]: r for r in decode if r["trace"] == trace and r["budget_pct"] == pct}
            best = max((rows[p] for p in OTHERS), key=lambda r: r["tokens_per_s"])
            real = [p for p in ("haq+path", "haq+pregate") if p in rows]
            lines.append(f"| {trace} | {pct}% | {best['policy']} {best['tokens_per_s']:.4g} | "
                         f"{rows['haq']['ratio_vs_best_other']:.3f} | "
                         + " / ".join(f"{rows[p]['ratio_vs_best_other']:.3f}" for p in real)
                         + f" | {rows['haq+oracle']['ratio_vs_best_other']:.3f} | "
                         f"{rows['haq']['layer_hit_std']:.3f} / {rows['lru']['layer_hit_std']:.3f} / "
                         f"{rows['fiddler']['layer_hit_std']:.3f} |")
    table = ("| trace | budget | best other (tok/s) | haq | haq + path / pregate prefetch | haq + oracle prefetch "
             "(ceiling) | layer hit std haq / lru / fiddler |\n|---|---|---|---|---|---|---|\n" + "\n".join(lines))
    acc = "; ".join(f"{r['model']} {r['source']} +{r['distance']}: {r['mean']:.2f}" for r in payload["accuracy"])
    plain = {r["phase"]: r["ratio_vs_best_other"] for r in payload["batch"] if r["policy"] == "haq, not pipelined"}
    batch = "; ".join(f"{r['phase']}: haq {r['ratio_vs_best_other']:.3f}x"
                      + (f" ({plain[r['phase']]:.3f}x not pipelined)" if r["phase"] in plain else "")
                      for r in payload["batch"] if r["policy"] == "haq")
    dedicated = RESULTS / "policy-speed.json"  # the longer, repeated run of --speed-only, when there is one
    measured = json.loads(dedicated.read_text())["rows"] if dedicated.exists() else payload["replay_speed"]
    speed = ", ".join(f"{r['policy']} {r['calls_per_s'] / 1e3:.0f}k" for r in measured)
    speed_source = "policy-speed.md" if dedicated.exists() else "policy.md"
    memory = "; ".join(f"{r['trace']} {r['phase']}: {r['device_bytes_saved_pct']:.0f}% less (int8 at "
                       f"{r['int8_budget_pct']}%)" if r["int8_budget_pct"] is not None else
                       f"{r['trace']} {r['phase']}: never within 90%" for r in payload.get("memory", []))
    return (f"*Placement policies and prefetch* (`bench/results/policy.md`, {payload['preset']} preset, decode at "
            "batch 1; ratios are tokens/s over the best of lru, fiddler and llamacpp)\n\n" + table + "\n\n"
            f"- Prediction accuracy (share of called experts in the predicted top-k): {acc}.\n"
            f"- Prefill and batched decode, synthetic Mixtral trace, 25% budget: {batch}.\n"
            f"- Replay speed, 64 experts top-6 26 layers (calls/s, `{speed_source}`): {speed}.\n"
            + (f"- Device bytes at >= 90% of FP16 all-resident tokens/s: {memory}.\n" if memory else ""))


def main() -> None:
    import torch

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--windows", type=int, default=16, help="wiki-offline test windows of 256 tokens per model")
    parser.add_argument("--speed-tokens", type=int, default=1024)
    parser.add_argument("--speed-repeats", type=int, default=3, help="interleaved rounds of the replay-speed runs")
    parser.add_argument("--summary-only", action="store_true", help="rewrite policy-summary.md from policy.json")
    parser.add_argument("--speed-only", action="store_true",
                        help="only (d), at --speed-tokens, into policy-speed.json/md (policy.json is kept)")
    args = parser.parse_args()
    if args.speed_only:
        load = os.getloadavg()[0]
        rows = speed_rows(args.speed_tokens, args.speed_repeats)
        md = (f"# Replay speed (simulator; 64 experts, top-6, 26 layers)\n\n`python bench/policy.py --speed-only "
              f"--speed-tokens {args.speed_tokens} --speed-repeats {args.speed_repeats}`: expert calls replayed per "
              f"second by `run_policy` (the steps are built first and not timed), 1 thread, the policies interleaved "
              f"{args.speed_repeats} times: median, and the slowest and fastest round; load average {load:.2f} at the "
              f"start, {os.getloadavg()[0]:.2f} at the end, git {git_rev()}. lru and fiddler replay in C "
              "(`haq/sim/replay.c`, bit-equal to the Python loop); haq in Python, its path predictions batched "
              "64 steps at a time.\n\n"
              + md_table(rows, ["policy", "calls", "seconds", "calls_per_s", "calls_per_s_min", "calls_per_s_max"]))
        write_results("policy-speed", {"machine": machine(), "git": git_rev(), "tokens": args.speed_tokens,
                                       "rows": rows}, md)
    if args.summary_only or args.speed_only:
        from haq.io import atomic_write_text

        atomic_write_text(RESULTS / "policy-summary.md", summary(json.loads((RESULTS / "policy.json").read_text())))
        return
    from haq.runtime.synthetic import (MIXTRAL_EXPERT_BYTES, MIXTRAL_EXPERT_FLOPS, MIXTRAL_NONEXPERT_BYTES_PER_LAYER,
                                       generate_synthetic_trace)

    start = time.perf_counter()
    sims, accuracy = [], []
    synthetic = generate_synthetic_trace(num_sequences=16, seq_len=256, seed=0)
    sims += sim_rows("synthetic Mixtral-8x7B", synthetic, MIXTRAL_EXPERT_BYTES, MIXTRAL_EXPERT_FLOPS,
                     MIXTRAL_NONEXPERT_BYTES_PER_LAYER, args.budgets)
    accuracy += accuracy_rows("synthetic Mixtral-8x7B", synthetic)
    traces = {}
    for name in ("smollm2-8x135m", "tiny-mixtral"):
        trace, config = recorded(name, args.windows)
        traces[name] = (trace, config)
        accuracy += accuracy_rows(name, trace)
        if name == "smollm2-8x135m":
            sims += sim_rows(f"{name} (at Mixtral size)", trace, MIXTRAL_EXPERT_BYTES, MIXTRAL_EXPERT_FLOPS,
                             MIXTRAL_NONEXPERT_BYTES_PER_LAYER, args.budgets)
        nbytes, flops = int8_expert_bytes(config)
        sims += sim_rows(name, trace, nbytes, flops, 0, args.budgets)
    figures = plots(sims)
    longer = generate_synthetic_trace(num_sequences=8, seq_len=576, seed=0)  # long enough for a 512-token prompt
    memory = memory_rows({"synthetic Mixtral-8x7B": (longer, MIXTRAL_EXPERT_BYTES, MIXTRAL_EXPERT_FLOPS,
                                                     MIXTRAL_NONEXPERT_BYTES_PER_LAYER),
                          **{f"{k} (at Mixtral size)": (v[0], MIXTRAL_EXPERT_BYTES, MIXTRAL_EXPERT_FLOPS,
                                                        MIXTRAL_NONEXPERT_BYTES_PER_LAYER) for k, v in traces.items()
                             if k == "smollm2-8x135m"},
                          **{k: (v[0], *int8_expert_bytes(v[1]), 0) for k, v in traces.items()}})
    figures.append(plot_memory(memory))
    batch = batch_rows([25])
    speed = speed_rows(args.speed_tokens, args.speed_repeats)
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
          + "ahead_per_token: prefill copies started a layer ahead per prompt token; device_gib: resident experts, "
          "staging buffers (one for copies not kept, plus the most copies started ahead held at once) and "
          "attention projections.\n\n"
          + md_table(batch, ["phase", "budget_pct", "policy", "ttft_ms", "prefill_tok_s", "decode_tok_s", "step_ms",
                             "cpu_share", "ahead_per_token", "device_gib", "ratio_vs_best_other"])
          + "\n## (d) Replay speed (64 experts, top-6, 26 layers)\n\n"
          + md_table(speed, ["policy", "calls", "seconds", "calls_per_s"])
          + "\n## (e) Device memory at equal service: int8 + haq at >= 90% of FP16 all-resident tokens/s\n\n"
          "Device bytes: resident experts + staging buffers (one if a copy is not kept, plus the prefill copies "
          "started a layer ahead) + attention projections "
          "(embeddings, norms and the KV cache are not counted); FP16 non-expert bytes are twice int8's. "
          "Recorded traces (256-token windows) have no 512-token prefill row.\n\n"
          + md_table(memory, ["trace", "phase", "fp16_tok_s", "fp16_device_gib", "int8_budget_pct", "int8_tok_s",
                              "int8_device_gib", "device_bytes_saved_pct"])
          + "\nPlots: " + ", ".join(f"`bench/results/{f}`" for f in figures) + "\n")
    for r in sims:
        r.pop("_result")
    payload = {"machine": machine(), "preset": PRESET, "minutes": round(seconds / 60, 1), "load": os.getloadavg()[0],
               "decode": sims, "accuracy": accuracy, "batch": batch, "replay_speed": speed, "memory": memory}
    write_results("policy", payload, md)
    from haq.io import atomic_write_text

    atomic_write_text(RESULTS / "policy-summary.md", summary(payload))


if __name__ == "__main__":
    main()
