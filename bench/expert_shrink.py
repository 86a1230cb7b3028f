"""The MoE with and without `expert_shrink`: `haq quantize smollm2-8x135m --method haq` with few
calibration windows, each setting in its own process (side by side), then `haq eval` on the peers'
protocol (wiki-offline test, 4 windows of 2048). Writes bench/results/expert_shrink.{json,md}."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, md_table, write_results

HAQ = [sys.executable, "-m", "haq.cli"]


def evaluate(model: str, out: Path) -> list[str]:
    return HAQ + ["eval", model, "--dataset", "wiki-offline", "--max-windows", "4", "--json", str(out)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-8x135m")
    parser.add_argument("--shrinks", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="haq-bench-shrink-"))
    start = time.perf_counter()
    jobs = {"fp": subprocess.Popen(evaluate(args.model, work / "fp.json"), cwd=ROOT)}
    for s in args.shrinks:
        ckpt = work / f"shrink-{s}"
        cmd = (f"{' '.join(HAQ)} quantize {args.model} --method haq --nsamples {args.nsamples} "
               f"--seqlen {args.seqlen} --expert-shrink {s} -o {ckpt} && {' '.join(evaluate(str(ckpt), work / f'{s}.json'))}")
        jobs[s] = subprocess.Popen(cmd, shell=True, cwd=ROOT)
    if any(job.wait() for job in jobs.values()):
        sys.exit("a quantization or evaluation failed (its output is above)")
    fp = json.loads((work / "fp.json").read_text())["ppl"]
    rows = []
    for s in args.shrinks:
        ppl = json.loads((work / f"{s}.json").read_text())["ppl"]
        rows.append({"model": args.model, "calibration": f"{args.nsamples} x {args.seqlen}", "expert_shrink": s,
                     "ppl": ppl, "fp_ppl": fp, "delta_pct": round(100 * (ppl / fp - 1), 3)})
    minutes = (time.perf_counter() - start) / 60
    md = (f"# expert_shrink on {args.model}\n\n`python bench/expert_shrink.py`: haq W8A8, every setting quantized "
          f"side by side ({minutes:.1f} min in all, load average {os.getloadavg()[0]:.2f}); wiki-offline test, "
          "4 windows of 2048 tokens.\n\n" + md_table(rows, ["model", "calibration", "expert_shrink", "ppl", "fp_ppl",
                                                            "delta_pct"]))
    write_results("expert_shrink", {"machine": machine(), "rows": rows, "minutes": round(minutes, 1)}, md)


if __name__ == "__main__":
    main()
