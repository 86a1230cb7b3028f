"""The quantizer at Mixtral-8x7B width: peak memory and seconds per layer of `haq quantize --offload`.

Builds (once, into a git-ignored folder; nothing is committed) a 2-layer slice of Mixtral-8x7B's
shape: hidden 4096, 8 experts of intermediate 14336 (top-2), 32 query / 8 KV heads, vocab 49152
(SmolLM2's tokenizer, for real calibration text), random bf16 weights written in Mixtral's own
checkpoint layout (one shard per layer, an index), loadable by transformers' MixtralForCausalLM.
Activation outliers are injected the way they appear in trained models: a few channels of every
RMSNorm weight are 20-40x the rest, so those channels of every norm output are large.

Each method runs in its own process (`haq.api.quantize(..., offload=True)`), which reports its
peak RSS (VmHWM); seconds per layer come from the checkpoint's haq_config.json. A reference cell
quantizes without offload (the whole float32 model in memory) to show the difference. The bound
(README, "Quantizing large models"; `bound_terms`) is evaluated for the slice and compared with the peaks.

Writes bench/results/scale.json ({"rows": [{"method","offload","peak_rss_gb","bound_gb","s_per_layer",
"total_s","extrapolated_32_layers_h"}], ...}) and scale.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, git_rev, machine, md_table, peak_rss_mb, write_results

SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
             num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
             rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False)
FULL_LAYERS = 32  # Mixtral-8x7B
VOCAB = 49152  # SmolLM2's tokenizer
OUTLIERS = 8  # channels per norm scaled up
GiB = 2**30


def build_slice(out: Path, seed: int = 0) -> Path:
    """The Mixtral-width slice, shard by shard (memory: one tensor at a time)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, MixtralConfig

    from haq import zoo

    if (out / "model.safetensors.index.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(zoo.build("smollm2-135m"))
    config = MixtralConfig(vocab_size=VOCAB, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, **SHAPE)
    gen = torch.Generator().manual_seed(seed)
    H, I = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    kv = SHAPE["num_key_value_heads"] * H // SHAPE["num_attention_heads"]

    def normal(*shape, fan_in):
        return (torch.randn(*shape, generator=gen) / fan_in ** 0.5).to(torch.bfloat16)

    def norm_weight():
        weight = torch.ones(H)
        channels = torch.randperm(H, generator=gen)[:OUTLIERS]
        weight[channels] = 20 + 20 * torch.rand(OUTLIERS, generator=gen)
        return weight.to(torch.bfloat16)

    shards = {"model-rest.safetensors": {"model.embed_tokens.weight": normal(config.vocab_size, H, fan_in=1),
                                         "model.norm.weight": norm_weight(),
                                         "lm_head.weight": normal(config.vocab_size, H, fan_in=H)}}
    for layer in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors = {p + "input_layernorm.weight": norm_weight(), p + "post_attention_layernorm.weight": norm_weight(),
                   p + "self_attn.q_proj.weight": normal(H, H, fan_in=H),
                   p + "self_attn.k_proj.weight": normal(kv, H, fan_in=H),
                   p + "self_attn.v_proj.weight": normal(kv, H, fan_in=H),
                   p + "self_attn.o_proj.weight": normal(H, H, fan_in=H),
                   p + "block_sparse_moe.gate.weight": normal(SHAPE["num_local_experts"], H, fan_in=H)}
        for e in range(SHAPE["num_local_experts"]):
            q = f"{p}block_sparse_moe.experts.{e}."
            tensors |= {q + "w1.weight": normal(I, H, fan_in=H), q + "w3.weight": normal(I, H, fan_in=H),
                        q + "w2.weight": normal(H, I, fan_in=I)}
        shards[f"model-layer{layer:02d}.safetensors"] = tensors
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, out / name, metadata={"format": "pt"})
        weight_map |= {key: name for key in tensors}
    shards.clear()
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def bound_terms(nsamples: int, seqlen: int, base: int) -> dict[str, int]:
    """The README's bound on the peak host memory of an offloaded run, by part (bytes):
    base   = the interpreter, torch, transformers, the tokenizer and calibration text (measured)
    rest   = 4 * P_rest                          the float32 model outside the decoder layers
    layer  = 7 * P_layer                         one float32 layer (4), and three int8 copies: the GPTQ and
                                                 RTN solutions haq compares, and the int8 modules
    stats  = 4 * sum_d d^2                       a float32 Hessian per distinct input d (q/k/v, o, each
                                                 expert's gate/up and down)
    solve  = 12 * I^2 + 16 * R * C               GPTQ's temporaries at the widest input I (permuted H,
                                                 factor, inverse) and the largest solve R x C (W, W^T, Q, Q*s)
    acts   = 8 * n * S * H                       the layer's float32 inputs and outputs"""
    H, I, E = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_local_experts"]
    kv = SHAPE["num_key_value_heads"] * H // SHAPE["num_attention_heads"]
    p_rest = 2 * VOCAB * H + H
    p_layer = 2 * H * H + 2 * kv * H + E * 3 * H * I + E * H + 2 * H
    hessians = 2 * H * H + E * (H * H + I * I)
    largest_solve = 2 * I * H  # an expert's gate and up rows, solved together
    return {"base": base, "rest": 4 * p_rest, "layer": 7 * p_layer, "stats": 4 * hessians,
            "solve": 12 * I * I + 16 * largest_solve, "acts": 8 * nsamples * seqlen * H}


def measure_base(slice_dir: Path, nsamples: int, seqlen: int) -> int:
    """Peak RSS (bytes) of a process that imports haq and tokenizes the calibration windows."""
    code = ("import sys; sys.path.insert(0, 'bench'); from common import peak_rss_mb; import torch, transformers; "
            "from haq import api; from haq.loading import load_tokenizer; from haq.data.windows import calib_windows; "
            f"calib_windows('wiki-offline', load_tokenizer(__import__('pathlib').Path({str(slice_dir)!r})), "
            f"nsamples={nsamples}, seqlen={seqlen}, seed=0); print(peak_rss_mb())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) * 2**20


def run_cell(method: str, slice_dir: Path, out: Path, offload: bool, nsamples: int, seqlen: int) -> dict:
    result = out.with_suffix(".json")
    cmd = [sys.executable, __file__, "--cell", method, "--slice", str(slice_dir), "--out", str(out),
           "--nsamples", str(nsamples), "--seqlen", str(seqlen)] + ([] if offload else ["--no-offload"])
    start = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        return {"method": method, "offload": offload, "error": f"exit {proc.returncode}"}
    cell = json.loads(result.read_text())
    cell["wall_s"] = round(time.perf_counter() - start, 1)
    return cell


def cell_main(args) -> None:
    import torch

    from haq import api
    from haq.quant.recipe import Recipe

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    out = api.quantize(args.slice, Recipe(method=args.cell), args.out, nsamples=args.nsamples, seqlen=args.seqlen,
                       offload=args.offload)
    meta = json.loads((Path(out) / "haq_config.json").read_text())
    seconds = [layer["seconds"] for layer in meta["layers"]]
    Path(args.out).with_suffix(".json").write_text(json.dumps({
        "method": args.cell, "offload": args.offload, "peak_rss_gb": round(peak_rss_mb() / 1024, 2),
        "s_per_layer": round(sum(seconds) / len(seconds), 1), "layer_s": [round(s, 1) for s in seconds],
        "total_s": round(time.perf_counter() - start, 1), "commit": git_rev(), "rotated": bool(meta.get("rotated"))}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / ".scale", help="slice and outputs (git-ignored)")
    ap.add_argument("--methods", nargs="+", default=["rtn", "smoothquant", "gptq", "haq"])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--no-reference", action="store_true", help="skip the in-memory (no offload) rtn cell")
    ap.add_argument("--update", action="store_true",
                    help="keep the rows of scale.json for the cells not run now (each row names its commit)")
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    ap.add_argument("--slice", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cell:
        return cell_main(args)
    slice_dir = build_slice(args.work / "mixtral-width-2l")
    base = measure_base(slice_dir, args.nsamples, args.seqlen)
    terms = bound_terms(args.nsamples, args.seqlen, base)
    cells = [(m, True) for m in args.methods] + ([] if args.no_reference else [("rtn", False)])
    kept = []
    if args.update and (ROOT / "bench" / "results" / "scale.json").is_file():
        previous = json.loads((ROOT / "bench" / "results" / "scale.json").read_text())["rows"]
        kept = [{"rotated": False, **r} for r in previous  # rows before the field: rotation was opt-in then
                if (r["method"], r["offload"]) not in cells]
    rows = []
    for method, offload in cells:
        out = args.work / f"q-{method}-{'offload' if offload else 'memory'}"
        partial = out.parent / f".{out.name}.partial"  # an interrupted earlier cell's layers: a cell times a whole run
        subprocess.run(["rm", "-rf", str(out), str(partial)])
        load = os.getloadavg()[0]
        row = run_cell(method, slice_dir, out, offload, args.nsamples, args.seqlen)
        row["load"] = round(load, 1)
        if "s_per_layer" in row:
            row["extrapolated_32_layers_h"] = round(row["s_per_layer"] * FULL_LAYERS / 3600, 2)
        row["bound_gb"] = round(sum(terms.values()) / GiB, 2) if offload else None
        row["within_bound"] = row.get("peak_rss_gb", 0) <= row["bound_gb"] if offload else None
        rows.append(row)
        print(row, flush=True)
        subprocess.run(["rm", "-rf", str(out)])
        write(args, kept + rows, terms)  # after every cell: a run stopped later keeps what it measured


def write(args, rows: list[dict], terms: dict[str, int]) -> None:
    terms = {k: round(v / GiB, 2) for k, v in terms.items()}
    payload = {"machine": machine(), "commit": git_rev(), "shape": SHAPE, "calibration":
               {"nsamples": args.nsamples, "seqlen": args.seqlen, "dataset": "wiki-offline"},
               "bound_terms_gb": terms, "rows": rows}
    columns = ["method", "offload", "rotated", "peak_rss_gb", "bound_gb", "within_bound", "s_per_layer",
               "extrapolated_32_layers_h", "load", "commit"]  # per-layer times: scale.json
    md = ("# Quantizer at Mixtral-8x7B width (2-layer slice, `bench/scale.py`)\n\n"
          f"Calibration: {args.nsamples} x {args.seqlen} wiki-offline tokens; each row at its commit; "
          f"{payload['machine']['cpu']}, {payload['machine']['threads']} threads.\n"
          f"Bound terms (GiB): {terms}; peak RSS is the cell process's VmHWM.\n\n" + md_table(rows, columns))
    write_results("scale", payload, md)


if __name__ == "__main__":
    main()
