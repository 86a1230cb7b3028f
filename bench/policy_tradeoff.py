"""How stable per-layer hit rates trade against mean latency. Writes
bench/results/policy-tradeoff.{json,md}, policy-tradeoff.png and policy-layer-hits.png.

haq's pin share (the part of the budget its two-stage placement pins; the rest is its LRU) moves
it between a balanced static placement and a cache of recent experts. For each budget (10/25/50%
of the expert bytes, RTX 4090 + PCIe 4.0 preset, decode at batch 1, no prefetch) this replays haq
at every pin share the tuner considers, the pin share the tuner picks on the profile half (the
default), and lru and fiddler, on the synthetic Mixtral-8x7B trace and on routing recorded from
smollm2-8x135m costed as Mixtral int8 experts: mean ms/token against the std over layers of the
hit rate (`SimResult.layer_hit_std`), plus the hit rate of every layer per policy.
"""
from __future__ import annotations

import argparse
import os
import time

from common import RESULTS, machine, md_table, write_results
from policy import PRESET, recorded


def curves(label: str, trace, budgets: list[int]) -> tuple[dict, list[dict]]:
    from haq.runtime.hardware import load_profile
    from haq.runtime.synthetic import MIXTRAL_EXPERT_BYTES, MIXTRAL_EXPERT_FLOPS, MIXTRAL_NONEXPERT_BYTES_PER_LAYER
    from haq.runtime.trace import split_by_sequence
    from haq.sim.tuning import PIN_SHARES, simulate

    profile, replayed = split_by_sequence(trace)
    total = MIXTRAL_EXPERT_BYTES * trace.meta.layers * trace.meta.num_experts
    sizes = [total * b // 100 for b in budgets]
    kwargs = dict(flops_per_token=MIXTRAL_EXPERT_FLOPS, profile_trace=profile,
                  nonexpert_bytes_per_layer=MIXTRAL_NONEXPERT_BYTES_PER_LAYER, prefetch="off")
    hw = load_profile(PRESET)
    out = {"haq (pin shares)": [], "haq (tuned: the default)": [], "lru": [], "fiddler": []}
    for share in sorted(PIN_SHARES):
        for r in simulate(replayed, hw, sizes, MIXTRAL_EXPERT_BYTES, ["haq"], pin_share=share, **kwargs):
            r.detail = f"{share:g}"
            out["haq (pin shares)"].append(r)
    tuned = {}  # budget -> the pin share the tuner picked
    for r in simulate(replayed, hw, sizes, MIXTRAL_EXPERT_BYTES, ["haq", "lru", "fiddler"], **kwargs):
        if r.policy == "haq":
            tuned[r.budget_bytes] = r.detail.split(",")[0].removeprefix("pin_share=")
        r.detail = ""
        out["haq (tuned: the default)" if r.policy == "haq" else r.policy].append(r)
    rows = [{"trace": label, "budget_pct": round(100 * r.budget_frac), "curve": name,
             "pin_share": r.detail or tuned.get(r.budget_bytes, "") if "haq" in name else "",
             "latency_mean_ms": r.latency_mean_s * 1e3, "tokens_per_s": r.tokens_per_s, "hit_rate": r.hit_rate,
             "layer_hit_std": r.layer_hit_std, "layer_hit_min": float(r.layer_hit_rate.min()),
             "layer_hit_max": float(r.layer_hit_rate.max())}
            for name, rs in out.items() for r in rs]
    return out, rows


def main() -> None:
    import torch

    from haq.runtime.synthetic import generate_synthetic_trace
    from haq.sim.plots import plot_layer_hit_rate, plot_tradeoff

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--windows", type=int, default=16, help="wiki-offline test windows of 256 tokens")
    args = parser.parse_args()
    start = time.perf_counter()
    traces = {"synthetic Mixtral-8x7B": generate_synthetic_trace(num_sequences=16, seq_len=256, seed=0),
              "smollm2-8x135m (at Mixtral size)": recorded("smollm2-8x135m", args.windows)[0]}
    rows, figures = [], []
    for label, trace in traces.items():
        out, trace_rows = curves(label, trace, args.budgets)
        rows += trace_rows
        stem = label.split(" ")[0].lower()
        figures.append(plot_tradeoff(out, RESULTS / f"policy-tradeoff-{stem}.png").name)
        layers = out["lru"] + out["fiddler"] + out["haq (tuned: the default)"]
        figures.append(plot_layer_hit_rate(layers, RESULTS / f"policy-layer-hits-{stem}.png").name)
    minutes = (time.perf_counter() - start) / 60
    cols = ["trace", "budget_pct", "curve", "pin_share", "latency_mean_ms", "tokens_per_s", "hit_rate",
            "layer_hit_std", "layer_hit_min", "layer_hit_max"]
    md = (f"# Per-layer hit-rate spread against mean latency\n\n`python bench/policy_tradeoff.py`: {PRESET} preset, "
          f"decode at batch 1, no prefetch; haq at each pin share the tuner considers and at the one it picks on the "
          f"profile half (the default). {minutes:.1f} min, load average {os.getloadavg()[0]:.2f}.\n\n"
          + md_table(rows, cols) + "\n" + "\n".join(f"![{f}]({f})" for f in figures) + "\n")
    write_results("policy-tradeoff", {"machine": machine(), "preset": PRESET, "budgets": args.budgets, "rows": rows,
                                      "figures": figures, "minutes": round(minutes, 2)}, md)


if __name__ == "__main__":
    main()
