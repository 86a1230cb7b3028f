"""The CPU engine against llama.cpp, side by side in one run: the same models (smollm2-135m dense,
smollm2-8x135m MoE), the same thread count, prompt 64 and decode 32 tokens, interleaved repetitions,
medians; with the measured DRAM read bandwidth and each model's bandwidth bound (tokens/s <= read
bandwidth / bytes read per decode token). Writes bench/results/engine.{json,md} (2 threads; other
thread counts: engine-tN.{json,md}; --name NAME: NAME.{json,md}).

    make bench-engine      (builds llama-bench into .peers/llama.cpp, converts the GGUFs, runs this)

haq: `Engine` with budget 0 (every expert on the CPU, the MoE path; the dense model runs its plain
forward), fp32 and int8 (W8A8 per-token rtn checkpoint: every recipe gives the same int8 kernels).
llama.cpp: `llama-bench -t THREADS -p 64 -n 32 -r 1` on GGUF F32 and Q8_0 from its own converter.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, git_rev, machine, md_table, write_results

LLAMA = ROOT / ".peers" / "llama.cpp"
PROMPT, DECODE = 64, 32
Q8_0_BYTES = 34 / 32  # per weight: 32 int8 + one fp16 scale per block of 32


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a streaming read (a sum over a buffer far larger than the caches), best of N."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        float(x.sum())
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def bytes_per_token(config: dict, weight_bytes: float, head_bytes: float | None = None) -> float:
    """Weights a decode token reads: everything but the embedding table and the unrouted experts,
    plus the lm_head (the tied embedding read whole, at `head_bytes` per weight when it is kept in
    another precision: haq's int8 checkpoints keep it and the routers in fp32); KV at this context
    is negligible."""
    h, v, layers = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    inter = config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = h // heads
    attn = h * head_dim * (heads + 2 * kv) + heads * head_dim * h
    experts, top_k = config.get("num_local_experts", 1), config.get("num_experts_per_tok", 1)
    mlp = 3 * h * inter * top_k
    router = h * experts if experts > 1 else 0
    head = head_bytes if head_bytes is not None else weight_bytes
    return layers * ((attn + mlp) * weight_bytes + router * head) + v * h * head


def convert(model: Path, out: Path, outtype: str) -> Path:
    if not out.is_file():
        env = {**os.environ, "PYTHONPATH": f"{LLAMA / 'gguf-py'}:{LLAMA / 'pydeps'}"}
        subprocess.run([sys.executable, str(LLAMA / "convert_hf_to_gguf.py"), str(model), "--outtype", outtype,
                        "--outfile", str(out)], check=True, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    return out


def llama_bench(gguf: Path, threads: int) -> dict:
    """llama-bench's prompt and decode rates. Its default repacks weights for the CPU's extra
    kernels (AMX on Sapphire Rapids); where that crashes (SIGSEGV in ggml_backend_amx_mul_mat,
    seen on a 2-core Sapphire Rapids VM), the run is repeated with `--repack 0` and says so."""
    base = [str(LLAMA / "build" / "bin" / "llama-bench"), "-m", str(gguf), "-t", str(threads),
            "-p", str(PROMPT), "-n", str(DECODE), "-r", "1", "-o", "json"]
    flags: list[str] = []
    result = subprocess.run(base, capture_output=True, text=True)
    if result.returncode < 0:
        flags = ["--repack", "0"]
        result = subprocess.run(base + flags, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({result.returncode}): {result.stderr.strip()[-300:]}")
    rows = json.loads(result.stdout)
    prompt = next(r for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
    decode = next(r for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return {"prompt_tok_s": prompt["avg_ts"], "decode_tok_s": decode["avg_ts"], "flags": " ".join(flags)}


def haq_bench(folder: Path, threads: int, prompt_ids: list[int]) -> dict:
    """One run in a fresh process (as a user's `haq run`), budget 0, greedy, no EOS stop."""
    code = f"""
import json, sys, time, torch
torch.set_num_threads({threads})
from haq.loading import load_model
from haq.models.adapters import adapter_for
from haq.runtime.sampling import SamplingParams
model, tok, path = load_model({str(folder)!r})
prompt = {prompt_ids!r}
params = SamplingParams(max_tokens={DECODE}, ignore_eos=True)
if adapter_for(model.config).moe is None:  # dense: the plain batch generator
    from haq.runtime.generation import BatchGenerator
    run = lambda: BatchGenerator(model, max_batch=1)
    gen = run(); gen.add(prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    while gen.has_work: gen.step()
    gen = run(); gen.add(prompt, params)
    start = time.perf_counter(); gen.step(); ttft = time.perf_counter() - start
    steps = []
    while gen.has_work:
        s = time.perf_counter(); gen.step(); steps.append(time.perf_counter() - s)
    print(json.dumps({{"prompt_tok_s": len(prompt) / ttft, "decode_tok_s": len(steps) / sum(steps)}}))
else:
    from haq.api import build_engine, profile_trace_for
    from haq.runtime.hardware import load_profile
    trace = profile_trace_for(model, tok, path.name, windows=2, seqlen=128)
    engine = build_engine(model, budget_bytes=0, hardware=load_profile("laptop"), profile=trace)
    engine.generate_batch([prompt], SamplingParams(max_tokens=2, ignore_eos=True))
    _, m = engine.generate_batch([prompt], params)
    print(json.dumps({{"prompt_tok_s": len(prompt) / (m.ttft_ms / 1000), "decode_tok_s": m.tokens_per_s}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "smollm2-8x135m"])
    parser.add_argument("--name", help="results file name (default engine, or engine-tN for N threads): "
                                       "another machine's run beside the recorded one")
    args = parser.parse_args()

    from haq import api, zoo
    from haq.quant.recipe import Recipe

    if not (LLAMA / "build" / "bin" / "llama-bench").is_file():
        sys.exit("llama-bench is not built: run bench/llamacpp/build.sh (or make bench-engine)")
    work = ROOT / ".peers" / "engine-models"
    work.mkdir(parents=True, exist_ok=True)
    configs, variants = {}, []
    for name in args.models:
        folder = zoo.build(name)
        configs[name] = json.loads((folder / "config.json").read_text())
        int8, int8_head = work / f"{name}-int8", work / f"{name}-int8-lm-head"
        for out, recipe in ((int8, Recipe(method="rtn")), (int8_head, Recipe(method="rtn", quantize_lm_head=True))):
            if not (out / "haq_config.json").is_file():
                api.quantize(str(folder), recipe, out, nsamples=2, seqlen=128, progress=False)
        tok = api.load(str(folder))[1]
        prompt_ids = tok("The history of the city begins in the early middle ages, when a small settlement "
                         "grew around the river crossing. " * 4)["input_ids"][:PROMPT]
        variants += [("haq", name, "fp32", lambda f=folder, p=prompt_ids: haq_bench(f, args.threads, p), (4.0, None)),
                     ("haq", name, "int8 W8A8", lambda f=int8, p=prompt_ids: haq_bench(f, args.threads, p), (1.0, 4.0)),
                     ("haq", name, "int8 W8A8, int8 lm_head", lambda f=int8_head, p=prompt_ids:
                      haq_bench(f, args.threads, p), (1.0, 1.0)),
                     ("llama.cpp", name, "F32", lambda g=convert(folder, work / f"{name}-f32.gguf", "f32"):
                      llama_bench(g, args.threads), (4.0, None)),
                     ("llama.cpp", name, "Q8_0", lambda g=convert(folder, work / f"{name}-q8_0.gguf", "q8_0"):
                      llama_bench(g, args.threads), (Q8_0_BYTES, None))]
    runs: dict[tuple, list[dict]] = {}
    loads, streams = [], []  # the stream is measured between repetitions too: this VM's drifts by 1.5x
    for rep in range(args.repeats):  # interleaved: every tool and model once per repetition
        streams.append(read_bandwidth(args.threads))
        for tool, model, weights, run, _ in variants:
            loads.append(os.getloadavg()[0])
            result = run()
            runs.setdefault((tool, model, weights), []).append(result)
            print(f"rep {rep + 1}: {tool} {model} {weights}: prompt {result['prompt_tok_s']:.1f} tok/s, "
                  f"decode {result['decode_tok_s']:.2f} tok/s", flush=True)
    # the bound must bound: where a tool's decode read its weights faster than the streaming sum
    # measured, the bandwidth is at least that (a decode token reads every byte in bytes_per_token)
    read_rates = {(tool, model, weights): max(r["decode_tok_s"] for r in runs[(tool, model, weights)])
                  * bytes_per_token(configs[model], *wbytes) for tool, model, weights, _, wbytes in variants}
    fastest = max(read_rates, key=read_rates.get)
    streams.append(read_bandwidth(args.threads))
    bandwidth_sum = statistics.median(streams)
    bandwidth = max(bandwidth_sum, read_rates[fastest])
    rows = []
    for tool, model, weights, _, wbytes in variants:
        rs = runs[(tool, model, weights)]
        decode = statistics.median(r["decode_tok_s"] for r in rs)
        rows.append({"tool": tool, "model": model, "weights": weights, "threads": args.threads,
                     "prompt_tok_s": round(statistics.median(r["prompt_tok_s"] for r in rs), 2),
                     "decode_tok_s": round(decode, 2), "ms_per_token": round(1000 / decode, 2),
                     "bound_tok_s": round(bandwidth / bytes_per_token(configs[model], *wbytes), 1),
                     "load": round(statistics.median(loads), 2), "decode_runs": [round(r["decode_tok_s"], 2) for r in rs],
                     "flags": " ".join(sorted({r.get("flags", "") for r in rs} - {""}))})
    ratios = []
    for model in args.models:
        get = {(r["tool"], r["weights"]): r for r in rows if r["model"] == model}
        ratios.append({"model": model,
                       "haq int8 / llama.cpp Q8_0 (decode)": round(get[("haq", "int8 W8A8")]["decode_tok_s"] /
                                                                   get[("llama.cpp", "Q8_0")]["decode_tok_s"], 3),
                       "haq fp32 / llama.cpp F32 (decode)": round(get[("haq", "fp32")]["decode_tok_s"] /
                                                                  get[("llama.cpp", "F32")]["decode_tok_s"], 3),
                       "haq int8 / haq fp32 (decode)": round(get[("haq", "int8 W8A8")]["decode_tok_s"] /
                                                             get[("haq", "fp32")]["decode_tok_s"], 3),
                       "haq int8 / its bound": round(get[("haq", "int8 W8A8")]["decode_tok_s"] /
                                                     get[("haq", "int8 W8A8")]["bound_tok_s"], 3),
                       "haq int8 lm_head / llama.cpp Q8_0": round(get[("haq", "int8 W8A8, int8 lm_head")]["decode_tok_s"]
                                                                  / get[("llama.cpp", "Q8_0")]["decode_tok_s"], 3),
                       "haq int8 lm_head / its bound": round(get[("haq", "int8 W8A8, int8 lm_head")]["decode_tok_s"] /
                                                             get[("haq", "int8 W8A8, int8 lm_head")]["bound_tok_s"], 3)})
    columns = ["tool", "model", "weights", "threads", "prompt_tok_s", "decode_tok_s", "ms_per_token", "bound_tok_s",
               "load", "decode_runs", "flags"]
    md = (f"# CPU engine vs llama.cpp ({machine()['cpu']}, {args.threads} threads)\n\n"
          f"`python bench/engine_peers.py` (`make bench-engine`): prompt {PROMPT} tokens, decode {DECODE}, "
          f"{args.repeats} interleaved repetitions, medians; load average median {statistics.median(loads):.2f}. "
          f"DRAM read bandwidth {bandwidth / 1e9:.1f} GB/s: the larger of a streaming 1 GiB sum "
          f"({bandwidth_sum / 1e9:.1f} GB/s, {args.threads} threads, the median of {len(streams)} measured before, "
          f"between and after the repetitions: {', '.join(f'{b / 1e9:.1f}' for b in streams)}) and the fastest decode's weight read rate "
          f"({read_rates[fastest] / 1e9:.1f} GB/s, {' '.join(fastest)}); "
          "bound_tok_s = bandwidth / weight bytes a decode token reads (attention, router, the top-k experts, "
          "the lm_head; haq's int8 checkpoints keep the lm_head and routers in fp32, llama.cpp's Q8_0 quantizes the "
          "lm_head too, as haq's `quantize_lm_head` recipe option does). haq: budget 0 (every expert on the CPU), "
          "decode steps in one kernel call (haq.runtime.native_decode). llama.cpp 0.3.36's llama-bench on GGUF from "
          f"its own converter. haq at git {git_rev()}.\n\n" + md_table(rows, columns) + "\n" + md_table(ratios, list(ratios[0])))
    name = args.name or ("engine" if args.threads == 2 else f"engine-t{args.threads}")  # the issue's: 2 threads
    write_results(name, {"machine": machine(), "bandwidth_Bps": bandwidth, "bandwidth_sum_Bps": bandwidth_sum,
                         "bandwidth_sum_samples_Bps": streams,
                         "rows": rows, "ratios": ratios}, md)


if __name__ == "__main__":
    main()
