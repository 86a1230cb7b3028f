"""Serving benchmark through the real HTTP server. Writes bench/results/serve.json and serve.md.

For each budget, `haq serve` runs as its own process on 127.0.0.1 (the engine measures this
machine's hardware profile unless --hardware names a preset); clients in this process stream
completions over HTTP (httpx, SSE). Per concurrency level (1 = the same prompts decoded one after another), the same requests:
aggregate output tokens/s, TTFT and inter-token latency percentiles from the client's clock, mean
decode batch, expert hit rate and CPU share from the server's /metrics (differences over the level).
Concurrency levels are interleaved and repeated; medians are reported with the load average.
Then a bounded soak at the highest concurrency: failed requests and the server's RSS before and after.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

from common import git_rev, machine, md_table, write_results


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, budget: str, max_batch: int, hardware: str | None, threads: int, prefill_chunk: int):
    """`haq serve` in its own process; returns (process, base URL) once it answers /health."""
    import httpx

    port = _port()
    cmd = [sys.executable, "-m", "haq.cli", "serve", model, "--gpu-budget", budget, "--port", str(port),
           "--max-batch", str(max_batch), "--max-queue", "1024", "--served-model-name", "m", "--threads", str(threads),
           "--prefill-chunk", str(prefill_chunk)]
    proc = subprocess.Popen(cmd + (["--hardware", hardware] if hardware else []))
    base = f"http://127.0.0.1:{port}"
    while proc.poll() is None:
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit(f"haq serve exited with {proc.returncode}")


async def one(http, base: str, prompt: str, max_tokens: int) -> dict:
    start, stamps, tokens, failed = time.perf_counter(), [], 0, False
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    try:
        async with http.stream("POST", f"{base}/v1/completions", json=body) as reply:
            if reply.status_code != 200:
                return {"failed": True}
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    failed = True
                elif chunk["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except Exception:  # a dropped connection is a failed request
        return {"failed": True}
    if not stamps:
        failed = True
    return {"failed": failed, "tokens": tokens, "ttft": stamps[0] - start if stamps else None,
            "itl": [b - a for a, b in zip(stamps, stamps[1:])]}


async def load(base: str, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[list[dict], float]:
    import httpx

    gate = asyncio.Semaphore(concurrency)

    async def gated(http, p):
        async with gate:
            return await one(http, base, p, max_tokens)

    async with httpx.AsyncClient(timeout=600) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*[gated(http, p) for p in prompts])
    return results, time.perf_counter() - start


def server_stats(base: str) -> dict[str, float]:
    """The /metrics samples this benchmark differences."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"haq_decode_batch_size_sum", "haq_decode_batch_size_count", "haq_expert_calls", "haq_expert_hits",
              "haq_expert_cpu_calls"}
    return {s.name: s.value for f in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)
            for s in f.samples if s.name in wanted}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1e3 if values else float("nan")


def measure(base: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    before = server_stats(base)
    results, wall = asyncio.run(load(base, prompts, concurrency, max_tokens))
    after = server_stats(base)
    d = {k: after[k] - before[k] for k in after}
    calls = max(d["haq_expert_calls"], 1)
    ok = [r for r in results if not r["failed"]]
    return {"tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50_ms": pct([r["ttft"] for r in ok], 0.5), "ttft_p99_ms": pct([r["ttft"] for r in ok], 0.99),
            "itl_p50_ms": pct([x for r in ok for x in r["itl"]], 0.5),
            "itl_p99_ms": pct([x for r in ok for x in r["itl"]], 0.99),
            "mean_batch": d["haq_decode_batch_size_sum"] / max(d["haq_decode_batch_size_count"], 1),
            "hit_rate": d["haq_expert_hits"] / calls, "cpu_share": d["haq_expert_cpu_calls"] / calls,
            "failed": len(results) - len(ok)}


def measure_budget(args, budget: str, servers: dict, prompts: list[str], path, rows: list[dict]) -> dict | None:
    """Every (prefill chunk, concurrency) level of one budget, interleaved, into `rows`; after the last
    budget, the soak on the first chunk's server (its row returned)."""
    for _, base in servers.values():
        asyncio.run(load(base, prompts[:2], 2, 4))  # warm-up: prepacking, allocator, first-touch pages
    levels = [(chunk, c) for chunk in args.prefill_chunks for c in args.concurrency]
    runs: dict[tuple[int, int], list[dict]] = {level: [] for level in levels}
    loads = []
    for _ in range(args.rounds):
        for chunk, c in levels:  # interleaved
            runs[chunk, c].append(measure(servers[chunk][1], prompts, c, args.max_tokens))
            loads.append(os.getloadavg()[0])
            print(budget, chunk, c, runs[chunk, c][-1], flush=True)
    for chunk, c in levels:
        row = {"model": path.name, "budget_pct": int(budget.rstrip("%")), "prefill_chunk": chunk, "concurrency": c}
        for key in runs[chunk, c][0]:
            values = [r[key] for r in runs[chunk, c]]
            row[key] = sum(values) if key == "failed" else statistics.median(values)
        row["load"] = round(statistics.median(loads), 2)
        rows.append(row)
    if budget != args.budgets[-1]:
        return None
    proc, base = servers[args.prefill_chunks[0]]
    rss0, start_t, failed, total = _rss_mb(proc.pid), time.perf_counter(), 0, 0
    while time.perf_counter() - start_t < args.soak_s:
        results, _ = asyncio.run(load(base, prompts, max(args.concurrency), args.max_tokens))
        failed += sum(r["failed"] for r in results)
        total += len(results)
    return {"budget": budget, "prefill_chunk": args.prefill_chunks[0],
            "seconds": round(time.perf_counter() - start_t, 1), "requests": total,
            "failed": failed, "rss_start_mb": round(rss0, 1), "rss_end_mb": round(_rss_mb(proc.pid), 1)}


def main() -> None:
    from haq.data.windows import eval_windows
    from haq.loading import load_model

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="the int8 haq checkpoint of smollm2-8x135m (from `haq quantize`)")
    parser.add_argument("--budgets", nargs="+", default=["0%", "25%"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--soak-s", type=float, default=120.0)
    parser.add_argument("--hardware", help="hardware preset (default: measured on this machine)")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (the clients use a core)")
    parser.add_argument("--prefill-chunks", type=int, nargs="+", default=[512],
                        help="the server's prompt tokens per step; several: one server each, measured interleaved")
    parser.add_argument("--name", default="serve", help="results file name under bench/results/")
    args = parser.parse_args()
    _, tokenizer, path = load_model(args.model)
    windows = eval_windows("wiki-offline", tokenizer, seqlen=48, max_windows=args.requests)
    prompts = [tokenizer.decode(w) for w in windows]
    rows, soak = [], {}
    args.prefill_chunks = list(dict.fromkeys(args.prefill_chunks))
    for budget in args.budgets:
        servers = {}  # one per chunk size, idle but for the one measured
        try:
            for chunk in args.prefill_chunks:
                servers[chunk] = start(args.model, budget, max(args.concurrency), args.hardware, args.threads, chunk)
            soak = measure_budget(args, budget, servers, prompts, path, rows) or soak
        finally:
            for proc, _ in servers.values():
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=120)
    one_by_one = {(r["budget_pct"], r["prefill_chunk"]): r["tokens_per_s"] for r in rows if r["concurrency"] == 1}
    for r in rows:
        r["vs_concurrency_1"] = r["tokens_per_s"] / one_by_one[r["budget_pct"], r["prefill_chunk"]]
    md = (f"# Serving (`haq serve`, real HTTP, streaming completions; {machine()['cpu']})\n\n"
          f"`python bench/serve.py {args.model}"
          + (f" --prefill-chunks {' '.join(map(str, args.prefill_chunks))}" if args.prefill_chunks != [512] else "")
          + f"` at git {git_rev()}: {path.name}, {args.requests} requests of {args.max_tokens} tokens per level, "
          f"greedy, medians of {args.rounds} interleaved rounds, server threads {args.threads}; concurrency 1 = the "
          "same prompts one after another; prefill chunk = the server's prompt tokens per step.\n\n"
          + md_table(rows, ["model", "budget_pct", "prefill_chunk", "concurrency", "tokens_per_s", "vs_concurrency_1",
                            "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "mean_batch", "hit_rate",
                            "cpu_share", "failed", "load"])
          + "\n## Soak\n\n" + md_table([soak], list(soak)))
    write_results(args.name, {"machine": machine(), "rows": rows, "soak": soak}, md)


if __name__ == "__main__":
    main()
