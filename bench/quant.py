"""Quantization quality and cost: every method on every model, same calibration and eval windows.

Each (model, method, setting) cell runs in its own process so its peak RSS is its own. Writes
bench/results/quant.json (rows {"model","method","wbits","abits","act","ppl","fp_ppl",
"delta_pct","quant_s","peak_rss_mb","tokens"}) and quant.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, md_table, peak_rss_mb, write_results

MODELS = ["smollm2-135m", "smollm2-8x135m", "tiny-mixtral", "tiny-mixtral+outliers"]
METHODS = ["rtn", "smoothquant", "gptq", "haq", "haq+norotate", "rtn+rotate"]
"""haq is the default recipe (--rotate auto: rotated where the architecture allows); +rotate / +norotate
force --rotate on / off."""
ROTATE = {"": "auto", "rotate": "on", "norotate": "off"}
SETTINGS = {"w8a8-token": (8, 8, "per-token"), "w8a8-tensor": (8, 8, "per-tensor"), "w8a6-token": (8, 6, "per-token"),
            "w8a16": (8, 16, "per-token")}  # weight-only: how much of the W8A8 loss is the weights'
WEIGHT_ONLY_METHODS = ("rtn", "gptq")  # smoothing has nothing to do when activations stay float


def load(model_name: str):
    from haq import zoo
    from haq.loading import load_model
    from haq.models.outliers import inject_outliers

    base = model_name.removesuffix("+outliers")
    zoo.build(base)
    model, tokenizer, _ = load_model(base)
    if model_name.endswith("+outliers"):
        inject_outliers(model, channels=4, factor=50.0)
    return model, tokenizer


def windows_file(model: str, args) -> Path:
    """Calibration and eval windows of a model, tokenized once and shared by all its cells."""
    import torch

    from haq.data.windows import calib_windows, eval_windows

    path = Path(args.windows_dir) / f"{model.removesuffix('+outliers')}.pt"
    if not path.exists():
        _, tokenizer = load(model)
        torch.save({"calib": calib_windows("wiki-offline", tokenizer, nsamples=args.nsamples,
                                           seqlen=args.calib_seqlen, seed=0),
                    "eval": eval_windows("wiki-offline", tokenizer, seqlen=2048, max_windows=args.max_windows)}, path)
    return path


def one_cell(args) -> dict:
    """Quantize and evaluate one cell in this process; prints its row as JSON."""
    import torch

    from haq.eval.perplexity import perplexity
    from haq.quant.pipeline import quantize_model
    from haq.quant.recipe import Recipe

    torch.manual_seed(0)
    model, _ = load(args.model)
    windows = torch.load(windows_file(args.model, args))
    wbits, abits, act = SETTINGS[args.setting]
    start = time.perf_counter()
    if args.method != "fp":
        method, _, variant = args.method.partition("+")
        recipe = Recipe(method=method, wbits=wbits, abits=abits, act=act, rotate=ROTATE[variant])
        quantize_model(model, recipe, windows["calib"], progress=False)
    quant_s = time.perf_counter() - start
    result = perplexity(model, windows["eval"], progress=False)
    peak_mb = peak_rss_mb()
    return {"model": args.model, "method": args.method, "setting": args.setting, "wbits": wbits,
            "abits": abits, "act": act, "ppl": result.ppl, "quant_s": round(quant_s, 1),
            "peak_rss_mb": round(peak_mb), "tokens": result.tokens}


def run_cell(model: str, method: str, setting: str, args) -> dict:
    cmd = [sys.executable, __file__, "--one", "--model", model, "--method", method, "--setting", setting,
           "--max-windows", str(args.max_windows), "--nsamples", str(args.nsamples),
           "--calib-seqlen", str(args.calib_seqlen), "--windows-dir", args.windows_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT / "bench")
    if proc.returncode != 0:
        raise SystemExit(f"cell {model} {method} {setting} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--stress-models", nargs="*", default=["tiny-mixtral", "tiny-mixtral+outliers"],
                        help="models that also run the stress settings (w8a8-tensor, w8a6-token) (the small ones by default: "
                             "a full grid on the 135M models takes hours on 2 cores)")
    parser.add_argument("--max-windows", type=int, default=4, help="wiki-offline test windows of 2048 tokens")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--resume", nargs="*", default=None, metavar="FILE",
                        help="reuse the cells of these result files (default quant.json) measured with the "
                             "same windows")
    parser.add_argument("--redo", nargs="*", default=[], metavar="METHOD",
                        help="measure these methods (or MODEL:METHOD cells) again even where --resume has their "
                             "cells (after a change)")
    parser.add_argument("--name", default="quant", help="results file stem under bench/results")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--setting", default="w8a8-token", help=argparse.SUPPRESS)
    parser.add_argument("--windows-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_cell(args)))
        return
    args.windows_dir = tempfile.mkdtemp(prefix="haq-bench-windows-")
    if args.resume == []:
        args.resume = ["quant.json"]
    done = previous_cells(args) if args.resume else {}
    rows: list[dict] = []
    fp_ppl: dict[str, float] = {}
    # Settings in the outer loop: the headline W8A8 per-token rows of every model come first.
    for setting in args.settings:
        for model in args.models:
            if setting not in ("w8a8-token", "w8a16") and args.stress_models is not None and model not in args.stress_models:
                continue
            if model not in fp_ppl:
                windows_file(model, args)
                fp = done.get((model, "fp", "fp")) or run_cell(model, "fp", "w8a8-token", args)
                fp_ppl[model] = fp["ppl"]
                rows.append({**fp, "setting": "fp", "wbits": 32, "abits": 32, "act": "-", "fp_ppl": fp["ppl"],
                             "delta_pct": 0.0})
            for method in args.methods:
                if SETTINGS[setting][1] > 8 and method not in WEIGHT_ONLY_METHODS:
                    continue
                redo = method in args.redo or f"{model}:{method}" in args.redo
                reuse = None if redo else done.get((model, method, setting))
                row = reuse or run_cell(model, method, setting, args)
                row.update(fp_ppl=fp_ppl[model], delta_pct=round(100 * (row["ppl"] / fp_ppl[model] - 1), 3))
                rows.append(row)
                write(rows, args, done=False)  # an interrupted run keeps what it measured
    order = ["fp", *SETTINGS]
    rows.sort(key=lambda r: (args.models.index(r["model"]), order.index(r["setting"])))
    shutil.rmtree(args.windows_dir, ignore_errors=True)
    write(rows, args, done=True)


def previous_cells(args) -> dict[tuple[str, str, str], dict]:
    """Cells of earlier runs (`--resume FILE...`, e.g. an interrupted run, or one that measured other
    models at the same time) with the same windows and calibration, keyed (model, method, setting)."""
    cells = {}
    for name in args.resume:
        path = Path(name) if Path(name).is_absolute() else ROOT / "bench" / "results" / name
        if not path.exists():
            continue
        old = json.loads(path.read_text())
        same = ("max_windows", "nsamples", "calib_seqlen")
        if any(old["args"].get(k) != getattr(args, k) for k in same):
            print(f"--resume: {path} used other windows or calibration; not reused", flush=True)
            continue
        found = {(r["model"], r["method"], r["setting"]): r for r in old["rows"]}
        print(f"--resume: reusing {len(found)} cells from {path}", flush=True)
        cells.update(found)
    return cells


def write(rows: list[dict], args, done: bool) -> None:
    table = md_table(rows, ["model", "setting", "method", "ppl", "fp_ppl", "delta_pct", "quant_s", "peak_rss_mb",
                            "tokens"])
    header = (f"# W8A8 quantization: wiki-offline test perplexity\n\nseqlen 2048, first {args.max_windows} "
              f"test windows for every row; calibration {args.nsamples} x {args.calib_seqlen} wiki-offline train "
              f"tokens (seed 0). delta_pct is vs the fp32 row of the same model; quant_s is the quantization "
              f"alone (calibration forward passes included, tokenization not).\n\n"
              + ("" if done else "**Partial: the run was still going when this was written.**\n\n"))
    settings = {k: v for k, v in vars(args).items()
                if k not in ("windows_dir", "one", "model", "method", "setting", "resume", "redo", "name")}
    write_results(args.name, {"machine": machine(), "args": settings, "complete": done, "rows": rows}, header + table)


if __name__ == "__main__":
    main()
