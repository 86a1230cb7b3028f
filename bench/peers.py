"""Side by side with the peers: llm-compressor, torchao and GPTQModel next to haq on the same models,
the same calibration windows (wiki-offline train, seed 0) and the same perplexity windows
(wiki-offline test, seqlen 2048, NLL summed in float64), each cell in its own process.

Rows: fp; llm-compressor SmoothQuant (0.8) + GPTQ W8A8; torchao W8A8 dynamic; GPTQModel W8A16;
haq rtn / smoothquant / gptq / haq / haq-norotate (W8A8, dynamic per-token activations; haq is the
default recipe, --rotate auto: a residual rotation and online Hadamard rotations of the dense down_proj
inputs where the architecture allows; haq-norotate is haq with --rotate off). Columns: ppl, delta %
vs fp, quantization wall time, peak RSS of the cell's process, and the CPU forward time of the
quantized model on one 2048-token window (the fastest eval window).

Each peer runs in its own venv under .peers/ (bench/peers/setup.sh pins the versions; `make
bench-peers` creates them), through a script in bench/peers/ that scores the model in its own
process with a copy of haq's perplexity loop; haq never imports the peers. haq's W8A8 checkpoint
of every model is also exported to compressed-tensors (`haq export`) and reloaded with
compressed-tensors / llm-compressor in .peers/llmc, its logits compared with haq's.

Writes bench/results/peers.json ({"rows": [{"model","tool","method","ppl","fp_ppl","delta_pct",
"quant_s","peak_rss_mb","forward_s"}], "export": [{"model","max_abs_logit_diff","ppl_ours",
"ppl_reloaded"}]}) and peers.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, ROOT, machine, md_table, peak_rss_mb, write_results

MODELS = ["smollm2-135m", "tiny-mixtral", "smollm2-8x135m"]
PEERS_DIR = Path(os.environ.get("HAQ_PEERS_DIR", ROOT / ".peers"))
# tool -> (venv under .peers/, script in bench/peers/)
PEERS = {"llm-compressor": ("llmc", "llmc.py"), "torchao": ("torchao", "torchao_w8a8.py"),
         "GPTQModel": ("gptqmodel", "gptqmodel_w8a16.py")}
HAQ_METHODS = ["rtn", "smoothquant", "gptq", "haq", "haq-norotate"]
ROTATE = {"": "auto", "rotate": "on", "norotate": "off"}  # the method's suffix -> --rotate
EXPORTED = ("haq",)  # the haq cells whose checkpoint is exported and reloaded with compressed-tensors
CELL_ORDER = [("haq", "haq"), ("llm-compressor", None), ("torchao", None), ("GPTQModel", None),
              ("haq", "haq-norotate"), ("haq", "rtn"), ("haq", "smoothquant"), ("haq", "gptq")]
ROW_ORDER = [("haq", "fp32"), ("llm-compressor", "smoothquant+gptq w8a8"), ("torchao", "int8 dynamic w8a8"),
             ("GPTQModel", "gptq w8a16 (bf16 activations)"), *[("haq", f"{m} w8a8") for m in HAQ_METHODS]]
COLUMNS = ["model", "tool", "method", "ppl", "fp_ppl", "delta_pct", "quant_s", "peak_rss_mb", "forward_s"]
PEER_ENV = {"GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def windows_file(model: str, args, work: Path) -> Path:
    """Calibration and eval windows, tokenized once by haq and shared by every cell of a model."""
    import torch
    from transformers import AutoTokenizer

    from haq import zoo
    from haq.data.windows import calib_windows, eval_windows

    path = work / f"{model}.windows.pt"
    if not path.exists():
        tokenizer = AutoTokenizer.from_pretrained(zoo.build(model))
        torch.save({"calib": calib_windows("wiki-offline", tokenizer, nsamples=args.nsamples,
                                           seqlen=args.calib_seqlen, seed=0),
                    "eval": eval_windows("wiki-offline", tokenizer, seqlen=2048, max_windows=args.max_windows)}, path)
    return path


def haq_cell(args) -> dict:
    """One haq cell in this process: quantize (unless fp), optionally save the checkpoint and the
    logits of the first eval window, then score with haq's own evaluator."""
    import torch

    from haq.eval.perplexity import window_nll
    from haq.loading import load_model
    from haq.quant.pipeline import quantize_model
    from haq.quant.recipe import Recipe

    torch.manual_seed(0)
    model, tokenizer, path = load_model(args.model)
    windows = torch.load(args.windows)
    method, _, rotate = args.method.partition("-")
    recipe = Recipe(method=method, rotate=ROTATE[rotate])
    start = time.perf_counter()
    report = quantize_model(model, recipe, windows["calib"], progress=False)
    quant_s = time.perf_counter() - start
    if args.save:
        from haq.checkpoint.native import save_quantized

        save_quantized(model, tokenizer, Path(args.save), report,
                       {"name": "wiki-offline", "split": "train", "seed": 0, "model": str(path),
                        "nsamples": windows["calib"].shape[0], "seqlen": windows["calib"].shape[1]})
        with torch.no_grad():
            logits = model(windows["eval"][:1], use_cache=False).logits[0].float()
        torch.save({"logits": logits}, f"{args.save}.reference_logits.pt")
    nll_sum, count, times = 0.0, 0, []
    for window in windows["eval"]:
        t0 = time.perf_counter()
        nll, n = window_nll(model, window)
        times.append(time.perf_counter() - t0)
        nll_sum, count = nll_sum + nll, count + n
    import math

    return {"tool": "haq", "method": "fp32" if args.method == "fp" else f"{args.method} w8a8",
            "ppl": math.exp(nll_sum / count), "tokens": count, "quant_s": round(quant_s, 1),
            "forward_s": round(min(times), 3), "peak_rss_mb": peak_rss_mb()}


def run(cmd: list[str], result: Path, timeout: float, env: dict | None = None) -> dict:
    """Run one cell; its row is the JSON it wrote (or an error row)."""
    if timeout <= 1:
        return {"error": "not run: the time budget (--budget-min) was spent"}
    result.unlink(missing_ok=True)  # never read a previous run's row
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    if proc.returncode != 0 or not result.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)[-400:]}"}
    row = json.loads(result.read_text())
    row["cell_s"] = round(time.perf_counter() - start, 1)
    return row


def run_haq(model: str, method: str, windows: Path, work: Path, timeout: float, save: Path | None = None) -> dict:
    result = work / f"{model}.haq-{method}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", "--model", model, "--method", method,
           "--windows", str(windows), "--result", str(result)] + (["--save", str(save)] if save else [])
    return run(cmd, result, timeout)


def run_peer(tool: str, model: str, windows: Path, work: Path, timeout: float) -> dict:
    from haq import zoo

    venv, script = PEERS[tool]
    python = PEERS_DIR / venv / "bin" / "python"
    if not python.exists():
        return {"tool": tool, "error": f"{python} missing: run bench/peers/setup.sh (make bench-peers does)"}
    result = work / f"{model}.{venv}.json"
    cmd = [str(python), str(ROOT / "bench" / "peers" / script), "--model", str(zoo.build(model)),
           "--windows", str(windows), "--result", str(result)]
    return {"tool": tool, **run(cmd, result, timeout, PEER_ENV)}


def check_export(model: str, ckpt: Path, windows: Path, work: Path, timeout: float, ppl_ours: float) -> dict:
    """`haq export` the W8A8 checkpoint and reload it with compressed-tensors in .peers/llmc."""
    from haq.errors import HaqError
    from haq.checkpoint.compressed_tensors import export_checkpoint

    try:
        ct = export_checkpoint(ckpt, work / f"{model}.compressed-tensors")
    except HaqError as exc:
        return {"model": model, "ppl_ours": ppl_ours, "error": f"export failed: {exc}"}
    result = work / f"{model}.reload.json"
    cmd = [str(PEERS_DIR / "llmc" / "bin" / "python"), str(ROOT / "bench" / "peers" / "ct_reload.py"),
           "--export", str(ct), "--windows", str(windows), "--reference", f"{ckpt}.reference_logits.pt",
           "--result", str(result)]
    row = run(cmd, result, timeout, PEER_ENV)
    return {"model": model, "ppl_ours": ppl_ours, **{k: row[k] for k in row if k not in ("threads", "cell_s")}}


def model_bytes(model: str) -> int:
    from haq import zoo

    return sum(f.stat().st_size for f in zoo.model_path(model).glob("*.safetensors")) if zoo.is_built(model) else 0


def previous_seconds(name: str, model: str, tools: list[str]) -> float | None:
    """What `model`'s cells took in the last run written under `name` with the same tools (if it has
    every cell's time), plus a quarter for its export check, which records none."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return None
    old = json.loads(path.read_text())
    if sorted(old.get("args", {}).get("tools", [])) != sorted(tools):
        return None
    cells = [r.get("cell_s") for r in old.get("rows", []) if r.get("model") == model]
    return 1.25 * sum(cells) if cells and None not in cells else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--tools", nargs="+", default=[*PEERS, "haq"], choices=[*PEERS, "haq"])
    parser.add_argument("--methods", nargs="+", default=HAQ_METHODS, choices=HAQ_METHODS,
                        help="haq's rows (fp32 always runs: every delta is against it)")
    parser.add_argument("--max-windows", type=int, default=4, help="wiki-offline test windows of 2048 tokens")
    parser.add_argument("--nsamples", type=int, default=8,
                        help="calibration windows (bench/quant.py uses 32: on 2 cores that does not fit 60 minutes "
                             "with every tool on two models)")
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--budget-min", type=float, default=50,
                        help="wall-clock budget: a model starts only if its estimated time still fits")
    parser.add_argument("--started-at", type=float, default=None,
                        help="count the budget and the total from this Unix time (make bench-peers passes its own "
                             "start, so creating the venvs counts too)")
    parser.add_argument("--name", default="peers", help="results file stem under bench/results/ (a partial run "
                        "of some models or tools goes beside peers.md, not over it)")
    parser.add_argument("--work-dir", help="keep windows, checkpoints and exports here (default: a temp folder)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--windows", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        from haq.io import atomic_write_text

        atomic_write_text(Path(args.result), json.dumps(haq_cell(args)) + "\n")
        return
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="haq-bench-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    # perf_counter is monotonic; the Unix start (if given) moves its origin back by the setup time.
    start = time.perf_counter() - (time.time() - args.started_at if args.started_at else 0.0)
    deadline = start + 60 * args.budget_min
    rows, exports, skipped = [], [], []
    last = None  # (bytes, seconds) of the largest finished model: scaled by size, the estimate for the next
    for model in args.models:
        left = deadline - time.perf_counter()
        estimate = previous_seconds(args.name, model, args.tools)
        if estimate is None:  # bytes overstate an MoE's time: its forward passes read only the routed experts
            estimate = last[1] * max(1.0, model_bytes(model) / max(last[0], 1)) if last else 0.0
        if estimate > left:
            skipped.append(f"{model} (estimated {estimate / 60:.0f} min, {left / 60:.0f} min left)")
            print(f"skipping {model}: {skipped[-1]}", flush=True)
            continue
        model_start = time.perf_counter()
        windows = windows_file(model, args, work)
        fp_ppl = None

        def add(row: dict) -> dict:
            row = {"model": model, **row, "fp_ppl": fp_ppl or row.get("ppl")}
            if fp_ppl and row.get("ppl"):
                row["delta_pct"] = round(100 * (row["ppl"] / fp_ppl - 1), 3)
            rows.append(row)
            print({k: row[k] for k in [*COLUMNS, "error"] if k in row}, flush=True)
            return row

        fp_ppl = add(run_haq(model, "fp", windows, work, deadline - time.perf_counter())).get("ppl")
        if fp_ppl:
            rows[-1]["delta_pct"] = 0.0
        # The headline pair first (haq W8A8, its export check, llm-compressor W8A8), so a run that
        # hits its budget loses the least telling rows.
        for tool, method in CELL_ORDER:
            if tool not in args.tools or (tool == "haq" and method not in args.methods):
                continue
            if tool != "haq":
                add(run_peer(tool, model, windows, work, deadline - time.perf_counter()))
                continue
            save = work / f"{model}.{method}-checkpoint" if method in EXPORTED else None
            row = add(run_haq(model, method, windows, work, deadline - time.perf_counter(), save))
            if save and row.get("ppl") and (PEERS_DIR / "llmc" / "bin" / "python").exists():
                exports.append({"checkpoint": method, **check_export(model, save, windows, work,
                                                                     deadline - time.perf_counter(), row["ppl"])})
                print(exports[-1], flush=True)
        rows.sort(key=lambda r: (args.models.index(r["model"]), ROW_ORDER.index((r.get("tool"), r.get("method")))
                                 if (r.get("tool"), r.get("method")) in ROW_ORDER else len(ROW_ORDER)))
        if last is None or model_bytes(model) >= last[0]:
            last = (model_bytes(model), time.perf_counter() - model_start)
        write(rows, exports, skipped, args, time.perf_counter() - start, done=False)
    write(rows, exports, skipped, args, time.perf_counter() - start, done=True)
    if not args.work_dir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def summary(rows: list[dict]) -> list[str]:
    """The claims the README makes, checked on these rows: haq W8A8 vs llm-compressor W8A8."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ours = next((r for r in rows if r["model"] == model and r.get("tool") == "haq" and r["method"] == "haq w8a8"), {})
        peer = next((r for r in rows if r["model"] == model and r.get("tool") == "llm-compressor"), {})
        if ours.get("ppl") and peer.get("ppl"):
            verdict = "no worse" if ours["ppl"] <= peer["ppl"] else "WORSE"
            lines.append(f"- {model}: haq W8A8 ppl {ours['ppl']:.4f} vs llm-compressor W8A8 {peer['ppl']:.4f} "
                         f"({verdict}); quantization time haq / llm-compressor = "
                         f"{ours['quant_s'] / max(peer['quant_s'], 1e-9):.2f} ({ours['quant_s']:.0f} s / "
                         f"{peer['quant_s']:.0f} s)")
        base = {m: next((r for r in rows if r["model"] == model and r.get("tool") == "haq" and r["method"] == f"{m} w8a8"
                         and r.get("ppl")), None) for m in ("rtn", "smoothquant")}
        if ours.get("ppl") and all(base.values()):
            worse = [m for m, r in base.items() if ours["ppl"] > r["ppl"]]
            lines.append(f"- {model}: haq (the default recipe) {ours['delta_pct']:+.3f}% vs fp "
                         f"({'within' if ours['delta_pct'] <= 0.5 else 'OUTSIDE'} +0.5%); "
                         + ", ".join(f"{m} {r['delta_pct']:+.3f}%" for m, r in base.items())
                         + (f" ({'WORSE than ' + ', '.join(worse) if worse else 'no worse than either'})"))
    return lines


# Why a peer can reach a lower perplexity than a W8A8 haq row, said next to the number.
TRADE = {"GPTQModel": "weight-only: its activations stay bfloat16, never rounded to int8"}


def why_haq(rows: list[dict]) -> str:
    """The README's "Why haq" paragraph, from the rows: where haq wins and, as plainly, where a peer does."""
    lines = summary(rows)
    for model in dict.fromkeys(r["model"] for r in rows):
        ours = next((r for r in rows if r["model"] == model and r.get("method") == "haq w8a8" and r.get("ppl")), None)
        if ours is None:
            continue
        for peer in (r for r in rows if r["model"] == model and r.get("tool") not in ("haq", None) and r.get("ppl")):
            better = []
            for what, key, unit in (("lower perplexity", "ppl", ""), ("faster quantization", "quant_s", " s"),
                                    ("faster CPU forward", "forward_s", " s"), ("lower peak RSS", "peak_rss_mb", " MB")):
                if peer.get(key) is not None and ours.get(key) is not None and peer[key] < ours[key]:
                    why = f"; {TRADE[peer['tool']]}" if key == "ppl" and peer["tool"] in TRADE else ""
                    better.append(f"{what} ({peer[key]:.6g}{unit} vs haq's {ours[key]:.6g}{unit}{why})")
            if better:
                lines.append(f"- {model}: {peer['tool']} {peer['method']} is better on: {', '.join(better)}")
    return "\n".join(lines) + "\n"


def write(rows, exports, skipped, args, seconds: float, done: bool) -> None:
    table = md_table([{**r, "method": r.get("method", "") + (f" (error: {r['error']})" if "error" in r else "")}
                      for r in rows], COLUMNS)
    export_table = md_table(exports, ["model", "checkpoint", "max_abs_logit_diff", "max_abs_logit_diff_ct",
                                      "argmax_agreement_ct", "ppl_ours", "ppl_reloaded", "ppl_reloaded_ct",
                                      "quantized_modules", "transformed_modules", "error"])
    text = (f"# haq next to llm-compressor, torchao and GPTQModel\n\n"
            f"wiki-offline test perplexity, seqlen 2048, first {args.max_windows} windows for every row; calibration "
            f"{args.nsamples} x {args.calib_seqlen} wiki-offline train tokens (seed 0), the same windows for every "
            f"tool. Each cell is its own process (peak_rss_mb is that process: load, quantization and evaluation). "
            f"quant_s is the quantization call alone; forward_s is one forward pass over 2048 tokens on the CPU "
            f"({machine()['threads']} threads). llm-compressor runs its result as simulated int8 (fake-quantized "
            f"float), torchao and haq as real int8 GEMMs, GPTQModel as int8 weights dequantized to bfloat16 "
            f"(its CPU kernel takes no float32). Total {seconds / 60:.1f} min{' (venv setup included)' if args.started_at else ''}.\n\n"
            + ("" if done else "**Partial: the run was still going when this was written.**\n\n")
            + table + "\n## Why haq (generated from these rows)\n\n" + why_haq(rows)
            + ("\nSkipped for time: " + ", ".join(skipped) + "\n" if skipped else "")
            + "\n## compressed-tensors export\n\n`haq export CKPT --format compressed-tensors` of the haq W8A8 "
            "checkpoints (rotated ones: their online rotations as a compressed-tensors transform_config, applied "
            "with compressed-tensors' apply_transform_config and the stored matrices), reloaded in .peers/llmc by transformers + compressed-tensors (per-expert MoE linears by "
            "llm-compressor's loading). max_abs_logit_diff: the loaded int8 tensors run with int8-kernel "
            "semantics (vLLM's: dynamic per-token scale absmax/127) vs haq's logits on the first eval window; "
            "*_ct: compressed-tensors' own CPU forward, which fake-quantizes activations with scale absmax/127.5.\n\n"
            + (export_table if exports else "(no export checked in this run)\n"))
    settings = {k: v for k, v in vars(args).items() if k not in ("one", "model", "method", "windows", "result", "save")}
    write_results(args.name, {"machine": machine(), "args": settings, "complete": done, "minutes": round(seconds / 60, 1),
                            "skipped": skipped, "rows": rows, "export": exports}, text)


if __name__ == "__main__":
    main()
