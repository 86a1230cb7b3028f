"""Int8 linear vs float nn.Linear at 4096x4096, and the end-to-end forward of a quantized model.

The int8 linear is the whole W8A8 path: per-token activation quantization, the int8 x int8 ->
int32 GEMM, and the float rescale. Both int8 GEMM backends are timed: `torch._int_mm` and the
exact float GEMM of the int8 values (what "auto" runs on CPUs without VNNI/AMX). Medians of
repeats, all in one run, reported as ratios to fp32. Writes bench/results/kernels.json and .md.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from common import machine, md_table, write_results


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@torch.no_grad()
def linear_rows(size: int, ms: list[int], repeats: int) -> list[dict]:
    from haq.kernels.int8 import Int8Linear, cpu_has_int8_dot

    torch.manual_seed(0)
    fp32 = nn.Linear(size, size, bias=False)
    bf16 = nn.Linear(size, size, bias=False).to(torch.bfloat16)
    backends = {"int8 (_int_mm)": Int8Linear.from_float(fp32, impl="int_mm"),
                "int8 (exact float GEMM)": Int8Linear.from_float(fp32, impl="float")}
    rows = []
    for m in ms:
        x = torch.randn(m, size)
        row = {"M": m, "K=N": size, "fp32_ms": median_ms(lambda: fp32(x), repeats)}
        row["bf16_ms"] = median_ms(lambda: bf16(x.bfloat16()), repeats)
        for name, module in backends.items():
            row[f"{name} ms"] = median_ms(lambda: module(x), max(1, repeats // 3) if "_int_mm" in name else repeats)
        for key in ("bf16_ms", "int8 (_int_mm) ms", "int8 (exact float GEMM) ms"):
            row[f"fp32/{key.removesuffix(' ms').removesuffix('_ms')}"] = row["fp32_ms"] / row[key]
        rows.append(row)
        print(row, flush=True)
    return rows, cpu_has_int8_dot()


@torch.no_grad()
def end_to_end(seqlen: int, repeats: int) -> dict:
    from haq import zoo
    from haq.data.corpora import calib_windows, eval_windows
    from haq.models.loading import load_model
    from haq.quant.pipeline import quantize_model
    from haq.quant.recipe import Recipe

    zoo.build("smollm2-135m")
    model, tokenizer, _ = load_model("smollm2-135m")
    ids = eval_windows("wiki-offline", tokenizer, seqlen=seqlen, max_windows=1)
    fp_ms = median_ms(lambda: model(ids, use_cache=False), repeats)
    quantize_model(model, Recipe(method="rtn"), calib_windows("wiki-offline", tokenizer, 2, 256), progress=False)
    q_ms = median_ms(lambda: model(ids, use_cache=False), repeats)
    return {"model": "smollm2-135m", "tokens": seqlen, "fp32_ms": fp_ms, "w8a8_ms": q_ms, "fp32/w8a8": fp_ms / q_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 16, 128, 512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--name", default="kernels", help="results file stem under bench/results")
    args = parser.parse_args()
    rows, has_dot = linear_rows(args.size, args.ms, args.repeats)
    e2e = end_to_end(args.seqlen, max(1, args.repeats // 2))
    cols = ["M", "fp32_ms", "bf16_ms", "int8 (_int_mm) ms", "int8 (exact float GEMM) ms", "fp32/bf16",
            "fp32/int8 (_int_mm)", "fp32/int8 (exact float GEMM)"]
    md = (f"# Int8 kernels vs float ({machine()['cpu']}, {torch.get_num_threads()} threads, "
          f"VNNI/AMX int8 dot products: {'yes' if has_dot else 'no'})\n\n"
          f"{args.size}x{args.size} linear, median of {args.repeats}; ratios > 1 mean faster than fp32.\n\n"
          + md_table(rows, cols)
          + f"\nEnd to end, {e2e['model']} forward on {e2e['tokens']} tokens: fp32 {e2e['fp32_ms']:.0f} ms, "
            f"W8A8 (auto backend) {e2e['w8a8_ms']:.0f} ms, ratio fp32/W8A8 = {e2e['fp32/w8a8']:.2f}\n")
    write_results(args.name, {"machine": machine(), "int8_dot_instructions": has_dot, "linear": rows,
                              "end_to_end": e2e}, md)


if __name__ == "__main__":
    main()
