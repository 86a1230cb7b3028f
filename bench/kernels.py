"""Int8 linear vs float nn.Linear at 4096x4096, and the end-to-end forward of a quantized model.

The int8 linear is the whole W8A8 path: per-token activation quantization, the int8 x int8 ->
int32 GEMM, and the float rescale. Every int8 GEMM backend this machine has is timed:
`torch._int_mm` (what "auto" runs on CUDA, and on CPUs with VNNI/AMX above 32 rows), FBGEMM with
the activation split (what "auto" runs on x86 CPUs up to 32 rows, and beyond without VNNI when K
is long) and the exact float GEMM of the int8 values (the fallback). Medians of repeats, all in one run, reported as ratios to fp32. Writes bench/results/kernels.json and .md.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from common import machine, md_table, write_results

from haq.kernels.backends.fbgemm import cpu_has_int8_dot
from haq.kernels.backends.fbgemm import has_fbgemm


def median_ms(fn, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@torch.no_grad()
def linear_rows(size: int, ms: list[int], repeats: int, device: torch.device) -> list[dict]:
    from haq.kernels.int8 import Int8Linear

    torch.manual_seed(0)
    fp32 = nn.Linear(size, size, bias=False).to(device)
    bf16 = nn.Linear(size, size, bias=False).to(device, torch.bfloat16)
    backends = {"int8 (auto)": Int8Linear.from_float(fp32, impl="auto"),
                "int8 (_int_mm)": Int8Linear.from_float(fp32, impl="int_mm"),
                "int8 (exact float GEMM)": Int8Linear.from_float(fp32, impl="float")}
    if device.type == "cpu" and has_fbgemm():
        backends["int8 (fbgemm split)"] = Int8Linear.from_float(fp32, impl="fbgemm")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    rows = []
    for m in ms:
        x = torch.randn(m, size, device=device)
        row = {"M": m, "K=N": size, "fp32_ms": median_ms(lambda: fp32(x), repeats, sync)}
        row["bf16_ms"] = median_ms(lambda: bf16(x.bfloat16()), repeats, sync)
        for name, module in backends.items():
            slow = "_int_mm" in name and device.type == "cpu" and not cpu_has_int8_dot()
            row[f"{name} ms"] = median_ms(lambda: module(x), max(1, repeats // 3) if slow else repeats, sync)
        for key in ["bf16_ms"] + [f"{name} ms" for name in backends]:
            row[f"fp32/{key.removesuffix(' ms').removesuffix('_ms')}"] = row["fp32_ms"] / row[key]
        rows.append(row)
        print(row, flush=True)
    return rows


def tokens_for(tokenizer, seqlen: int) -> tuple[torch.Tensor, str]:
    """A wiki-offline test window, or seeded random ids where the corpus is not installed (the
    speed of a dense forward does not depend on which tokens it sees)."""
    from haq.data.windows import eval_windows
    from haq.errors import HaqError

    try:
        return eval_windows("wiki-offline", tokenizer, seqlen=seqlen, max_windows=1), "wiki-offline test"
    except HaqError:
        ids = torch.randint(0, tokenizer.vocab_size, (1, seqlen), generator=torch.Generator().manual_seed(0))
        return ids, "random ids (wiki-offline not installed)"


@torch.no_grad()
def end_to_end(model_name: str, seqlens: list[int], repeats: int, device: torch.device) -> list[dict]:
    """fp32 vs W8A8 RTN (auto backend) forward of the whole model, one row per sequence length."""
    from haq import zoo
    from haq.loading import load_model
    from haq.quant.pipeline import quantize_model
    from haq.quant.recipe import Recipe

    zoo.build(model_name)
    model, tokenizer, _ = load_model(model_name)
    ids, source = tokens_for(tokenizer, max(seqlens))
    model, ids = model.to(device), ids.to(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    fp_ms = [median_ms(lambda: model(ids[:, :n], use_cache=False), repeats, sync) for n in seqlens]
    quantize_model(model.cpu(), Recipe(method="rtn"), ids[:, :256].cpu(), progress=False)
    model = model.to(device)
    q_ms = [median_ms(lambda: model(ids[:, :n], use_cache=False), repeats, sync) for n in seqlens]
    return [{"model": model_name, "tokens": n, "token_source": source, "fp32_ms": f, "w8a8_ms": q, "fp32/w8a8": f / q}
            for n, f, q in zip(seqlens, fp_ms, q_ms)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 16, 128, 512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 16],
                        help="end-to-end forward lengths (prefill-sized and decode-batch-sized)")
    parser.add_argument("--name", default="kernels", help="results file stem under bench/results")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="smollm2-135m", help="zoo model for the end-to-end forward")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = linear_rows(args.size, args.ms, args.repeats, device)
    e2e = end_to_end(args.model, args.seqlens, max(3, args.repeats // 2), device)
    has_dot = cpu_has_int8_dot()
    where = (f"{torch.cuda.get_device_name(device)}" if device.type == "cuda" else
             f"{machine()['cpu']}, {torch.get_num_threads()} threads, VNNI/AMX int8 dot products: "
             f"{'yes' if has_dot else 'no'}")
    names = [key.removesuffix(" ms") for key in rows[0] if key.startswith("int8 (")]
    cols = ["M", "fp32_ms", "bf16_ms", *[f"{n} ms" for n in names], "fp32/bf16", *[f"fp32/{n}" for n in names]]
    md = (f"# Int8 kernels vs float ({where})\n\n"
          f"{args.size}x{args.size} linear, median of {args.repeats}; ratios > 1 mean faster than fp32. "
          f"The int8 rows are the whole W8A8 path: per-token activation quantization, the int8 GEMM, the rescale.\n\n"
          + md_table(rows, cols)
          + f"\nEnd to end, {args.model} forward ({e2e[0]['token_source']}), W8A8 RTN with the auto backend "
            f"({'torch._int_mm' if device.type == 'cuda' else 'picked per GEMM shape'}):\n\n"
          + md_table(e2e, ["tokens", "fp32_ms", "w8a8_ms", "fp32/w8a8"]))
    write_results(args.name, {"machine": machine(), "device": str(device), "int8_dot_instructions": has_dot,
                              "linear": rows, "end_to_end": e2e}, md)


if __name__ == "__main__":
    main()
