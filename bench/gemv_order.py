"""The int8 GEMV's load order alone (bench/gemv_order.c): rows interleaved (haq's loop
before b77e364) against rows read one after another (after), on a [276480, 576] int8 weight
(159 MB, K as smollm2's hidden size), 1 and 2 threads, interleaved rounds, medians; beside torch's
fp32 sum of 1 GiB as the stream this CPU sustains. Needs gcc and AVX-512 VNNI. Writes
bench/results/gemv-order.{json,md}."""
from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import machine, md_table, write_results

HERE = Path(__file__).resolve().parent
N, K, REPEATS = 276480, 576, 9


def stream_gbs(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    big = torch.ones(2**28)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        big.sum()
        times.append(time.perf_counter() - t)
    return big.numel() * 4 / statistics.median(times) / 1e9


def main() -> None:
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "gemv_order"
        subprocess.run(["gcc", "-O3", "-march=native", "-fopenmp", str(HERE / "gemv_order.c"),
                        "-o", str(exe)], check=True)
        out = subprocess.run([str(exe), str(N), str(K), str(REPEATS)], check=True, capture_output=True,
                             text=True).stdout
    times: dict[tuple[int, int], list[float]] = {}
    for line in out.split("\n"):
        if line:
            threads, sequential, seconds = line.split()
            times.setdefault((int(threads), int(sequential)), []).append(float(seconds))
    rows = []
    for threads in (1, 2):
        inter, seq = (N * K / statistics.median(times[threads, s]) / 1e9 for s in (0, 1))
        rows.append({"threads": threads, "interleaved_GBps": round(inter, 1), "sequential_GBps": round(seq, 1),
                     "sequential_over_interleaved": round(seq / inter, 2),
                     "fp32_sum_stream_GBps": round(stream_gbs(threads), 1)})
    md = (f"# int8 GEMV load order ({machine()['cpu']})\n\n`python bench/gemv_order.py`: [{N}, {K}] int8 weights, "
          f"one activation row, VNNI, prefetch 8 KiB ahead in both; medians of {REPEATS} interleaved rounds; "
          f"the sums of both orders checked equal; load average {load:.2f}.\n\n"
          + md_table(rows, list(rows[0])))
    write_results("gemv-order", {"machine": machine(), "N": N, "K": K, "repeats": REPEATS, "load": load,
                                 "rows": rows}, md)


if __name__ == "__main__":
    main()
