"""Issue 14's memory claim in the engine, one short script for a lent GPU (about two minutes):
the bundled tiny-mixtral with 16-bit (bf16) experts all resident on the device (the fiddler policy
preloads them all) against int8 (RTN W8A8) experts under the haq policy at budgets of 5-100% of
the int8 expert bytes (--budgets). Per configuration: decode tokens/s (a 32-token prompt, then --new-tokens),
prefill tokens/s (a --prefill-token prompt over its time to first token), medians of --repeats,
and the device bytes the engine counted (peak resident experts + staging buffers + the non-expert
weights + the KV cache). Then, per phase, the smallest int8 budget that keeps >= 90% of the bf16
all-resident tokens/s and its device bytes against bf16's, and the perplexity of both models
on --text (default: the wiki-offline test split when installed; the device has no dataset package,
so carry a file made with `python -c "from haq.data import wiki_offline; print(wiki_offline.text('test'))"`).

Writes OUT/engine-memory-GPU.{json,md} (GPU: h200, h100, ..., or smoke; the JSON after every
configuration, so a run cut short keeps what it measured) and a plot of tokens/s vs device MiB (OUT: --out,
default bench/results; `--no-plot` leaves the plot out, for a machine without matplotlib or with a
limit on the files it returns, and `--replot JSON` draws it later from the JSON). `--smoke` runs a
few budgets on the CPU (the device is the host there: the figures check the script, they are not
the claim).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import gpu_slug, md_table  # noqa: E402

TINY = ROOT / "haq" / "zoo" / "assets" / "tiny-mixtral"


def load_text(path: str | None) -> str:
    """--text, or the wiki-offline test split; a missing one ends the script with a one-line reason."""
    from haq.errors import HaqError

    if path:
        if not Path(path).is_file():
            sys.exit(f"--text {path}: no such file (`make gpu-text` writes .gpu/text.txt)")
        return Path(path).read_text()
    from haq.data import wiki_offline

    try:
        return wiki_offline.text("test")
    except HaqError as e:
        sys.exit(f"{e}; or pass --text FILE")


def measure(engine, prompt, long_prompt, new_tokens: int, repeats: int) -> dict:
    """Medians over `repeats` (after a warm-up) of decode tokens/s and prefill tokens/s, and the
    most device bytes any run held."""
    engine.generate(prompt, max_new_tokens=4)
    engine.generate(long_prompt, max_new_tokens=1)
    decode, prefill, peak = [], [], 0
    for _ in range(repeats):
        _, m = engine.generate(prompt, max_new_tokens=new_tokens)
        decode.append(m.tokens_per_s)
        peak = max(peak, m.device_bytes["total"])
        _, m = engine.generate(long_prompt, max_new_tokens=1)
        prefill.append(long_prompt.shape[1] / (m.ttft_ms / 1e3))
        peak = max(peak, m.device_bytes["total"])
    return {"decode_tok_s": statistics.median(decode), "prefill_tok_s": statistics.median(prefill),
            "device_mib": peak / 2**20}


def run(args, device, save) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from haq.api import build_engine
    from haq.eval.perplexity import perplexity
    from haq.quant.pipeline import quantize_model
    from haq.quant.recipe import Recipe
    from haq.runtime.profile_hw import profile_hardware
    from haq.runtime.record import record_trace
    from haq.runtime.store import extract_experts

    tokenizer = AutoTokenizer.from_pretrained(TINY)
    ids = tokenizer(load_text(args.text), return_tensors="pt").input_ids[0]
    seqlen, windows = 256, 4 if args.smoke else 16
    used = (windows + 6) * seqlen  # perplexity windows, 2 calibration, 4 for the routing profile
    if ids.numel() < used + args.prefill_tokens:
        sys.exit(f"--text has {ids.numel()} tokens, need {used + args.prefill_tokens}")
    data = ids[:used].view(-1, seqlen)
    ppl_windows, calib, profile_ids = data[:windows], data[windows:windows + 2], data[windows + 2:]
    prompt, long_prompt = ids[used:used + 32][None], ids[used:used + args.prefill_tokens][None]
    base = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
    int8 = copy.deepcopy(base)
    quantize_model(int8, Recipe(method="rtn"), calib, progress=False)
    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    ppl = {"bf16": perplexity(copy.deepcopy(bf16).to(device), ppl_windows.to(device), progress=False).ppl,
           "int8": perplexity(copy.deepcopy(int8).to(device), ppl_windows.to(device), progress=False).ppl}
    profile = record_trace(base, profile_ids, "tiny-mixtral", progress=False)
    L = base.config.num_hidden_layers
    weights, math = extract_experts(int8.model.layers[0].mlp.experts)
    hardware = profile_hardware(weights[0], math, device=device.type, repeats=3 if args.smoke else 10)
    int8_total = weights[0].nbytes * len(weights) * L
    bf16_weights, _ = extract_experts(bf16.model.layers[0].mlp.experts)
    bf16_total = bf16_weights[0].nbytes * len(bf16_weights) * L
    rows = []
    result = {"ppl": ppl, "rows": rows, "expert_mib": {"bf16": bf16_total / 2**20, "int8": int8_total / 2**20}}

    def add(label: str, model, budget: int, policy: str, pct: int) -> None:
        engine = build_engine(copy.deepcopy(model), budget_bytes=budget, hardware=hardware, policy=policy,
                              profile=profile, device=device.type)
        try:
            rows.append({"experts": label, "policy": policy, "budget_pct": pct,
                         **measure(engine, prompt, long_prompt, args.new_tokens, args.repeats)})
        finally:
            engine.close()
        print(rows[-1], flush=True)
        save(result)

    add("bf16 all resident", bf16, bf16_total, "fiddler", 100)
    for pct in args.budgets:
        add("int8", int8, int8_total * pct // 100, "haq", pct)
    result["summary"] = summarize(rows)
    return result


def summarize(rows: list[dict]) -> list[dict]:
    """Per phase: the smallest int8 budget within 90% of bf16 all-resident, and its device bytes."""
    ref, sweep = rows[0], sorted(rows[1:], key=lambda r: r["budget_pct"])
    out = []
    for phase in ("decode_tok_s", "prefill_tok_s"):
        best = next((r for r in sweep if r[phase] >= 0.9 * ref[phase]), None)
        out.append({"phase": phase.split("_")[0], "bf16_tok_s": ref[phase], "bf16_device_mib": ref["device_mib"],
                    "int8_budget_pct": best["budget_pct"] if best else None,
                    "int8_tok_s": best[phase] if best else None,
                    "int8_device_mib": best["device_mib"] if best else None,
                    "device_bytes_saved_pct": 100 * (1 - best["device_mib"] / ref["device_mib"]) if best else None})
    return out


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6))
    for i, phase in enumerate(("decode_tok_s", "prefill_tok_s")):
        ax = fig.add_subplot(1, 2, i + 1)
        sweep = [r for r in rows if r["experts"] == "int8"]
        ax.plot([r["device_mib"] for r in sweep], [r[phase] for r in sweep], marker=".", label="int8, haq")
        ax.scatter([rows[0]["device_mib"]], [rows[0][phase]], marker="*", s=120, color="C1", label="bf16 all resident")
        ax.set_xlabel("device MiB (experts + staging + non-expert + KV)")
        ax.set_ylabel(f"{phase.split('_')[0]} tokens/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.subplots_adjust(wspace=0.35)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--text", help="a text file (default: the wiki-offline test split)")
    parser.add_argument("--smoke", action="store_true", help="a few budgets on the CPU, to check the script")
    parser.add_argument("--budgets", type=int, nargs="+", default=[5, 10, 15, 20, 25, 30, 40, 50, 60, 70, 80, 90, 100])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-plot", action="store_true", help="write the JSON and the table only")
    parser.add_argument("--replot", metavar="JSON", help="draw the plot of an earlier run's JSON, beside it")
    args = parser.parse_args()
    if args.replot:
        path = Path(args.replot)
        plot(json.loads(path.read_text())["rows"], path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
        return
    import torch

    from haq.io import atomic_write_text

    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on the GPU machine, or --smoke on the CPU")
    if args.smoke:
        args.budgets, args.new_tokens, args.prefill_tokens, args.repeats = [25, 100], 8, 64, 1
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke)"
    name = f"engine-memory-{'smoke' if args.smoke else gpu_slug(gpu)}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(partial: dict) -> None:
        payload = {"gpu": gpu, "torch": torch.__version__, "args": vars(args), **partial}
        atomic_write_text(out / f"{name}.json", json.dumps(payload, indent=1) + "\n")

    result = run(args, device, save)
    save(result)
    if not args.no_plot:
        plot(result["rows"], out / f"{name}.png")
    ppl = result["ppl"]
    atomic_write_text(out / f"{name}.md", f"# Device memory at equal service, engine, tiny-mixtral ({gpu}, torch "
                      f"{torch.__version__})\n\n`python bench/gpu_memory.py`: perplexity bf16 {ppl['bf16']:.3f}, "
                      f"int8 {ppl['int8']:.3f} ({len(result['rows']) - 1} int8 budgets; plot: {name}.png, or "
                      f"`--replot {name}.json`).\n\n"
                      + md_table(result["summary"]) + "\n" + md_table(result["rows"]))
    print(f"wrote {out / name}.json and .md" + ("" if args.no_plot else " and .png"))


if __name__ == "__main__":
    main()
