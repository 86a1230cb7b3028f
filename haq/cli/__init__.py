"""`haq` command line: parses arguments and calls the Python API; user errors print as one line."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from haq.cli import engine_commands
from haq.cli.parsing import Parser, add_recipe_flags, add_threads_option, apply_threads
from haq.cli.engine_commands import write_json as _write_json
from haq.errors import HaqError


def cmd_zoo(args: argparse.Namespace) -> None:
    from haq import zoo

    if args.zoo_cmd == "list":
        for entry in zoo.ZOO.values():
            state = "built" if zoo.is_built(entry.name) else "-"
            print(f"{entry.name:22s} {state:6s} {entry.description}")
    else:
        for name in args.names:  # every name before any build, not after the first
            zoo.entry_of(name)
        for name in args.names:
            print(zoo.build(name, force=args.force))


def cmd_eval(args: argparse.Namespace) -> None:
    from haq.data.sources import resolve
    from haq.data.windows import eval_windows
    from haq.eval.perplexity import perplexity
    from haq.loading import check_seqlen, load_model

    resolve(args.dataset)  # a bad dataset fails before the model loads
    model, tokenizer, path = load_model(args.model, int8_backend=args.int8_backend)
    check_seqlen(model, args.seqlen)
    windows = eval_windows(args.dataset, tokenizer, seqlen=args.seqlen, max_windows=args.max_windows)
    result = perplexity(model, windows)
    print(f"{path.name}  {args.dataset}  seqlen {result.seqlen}  windows {result.windows}  "
          f"tokens {result.tokens}  ppl {result.ppl:.4f}  ({result.seconds:.1f}s)")
    if args.json:
        _write_json(args.json, {"model": str(path), "dataset": args.dataset, **result.to_dict()})


def cmd_quantize(args: argparse.Namespace) -> None:
    from haq.api import quantize
    from haq.quant.recipe import Recipe

    fields = Recipe.from_file(args.recipe) if args.recipe else {}
    flags = {k[len("recipe_"):]: v for k, v in vars(args).items() if k.startswith("recipe_")}  # only those given
    fields.update(flags)
    recipe = Recipe.from_dict(fields)
    for name in recipe.ignored(set(flags)):  # a recipe file may hold every field; a flag is a choice
        logging.warning("--%s has no effect with --method %s", name.replace("_", "-"), recipe.method)
    out = quantize(args.model, recipe, args.output, calib=args.calib, nsamples=args.nsamples,
                   seqlen=args.seqlen, seed=args.seed, offload=args.offload, device=args.device)
    print_quant_summary(out)


def print_quant_summary(out) -> None:
    """What the run chose, from the checkpoint's own haq_config.json."""
    from haq.checkpoint.native import read_quant_config

    meta = read_quant_config(out)
    recipe, layers = meta["recipe"], meta.get("layers", [])
    calibration = meta.get("calibration", {})
    rotated = ", rotated" if meta.get("rotated") else ""
    print(f"wrote {out}: {recipe['method']} W{recipe['wbits']}A{recipe['abits']}{rotated}, "
          f"{meta.get('quant_seconds', 0):.0f}s, "
          f"{calibration.get('tokens', 0)} calibration tokens ({calibration.get('name', '?')})")
    for layer in layers:
        alphas = ", ".join(f"{k} {'-' if v is None else f'{v:g}'}" for k, v in layer.get("alphas", {}).items())
        notes = [layer["weights"]] if layer.get("weights") else []
        if layer.get("fallbacks"):
            notes.append(f"{len(layer['fallbacks'])} fallbacks")
        print(f"  layer {layer['index']:3d}  {layer.get('seconds', 0):6.1f}s  alphas: {alphas or '-'}"
              + (f"  ({', '.join(notes)})" if notes else ""))


def cmd_export(args: argparse.Namespace) -> None:
    from haq.checkpoint.compressed_tensors import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.output, fmt=args.format)
    print(f"wrote {out} ({args.format}); serve it with: vllm serve {out} --dtype bfloat16")


def _record_trace(args: argparse.Namespace):
    """Routing of MODEL on --dataset windows, saved to --output; shared by `trace` and `profile`."""
    from haq.data.sources import resolve
    from haq.data.windows import eval_windows
    from haq.loading import check_seqlen, load_model
    from haq.runtime.record import record_trace
    from haq.runtime.trace import save_trace

    resolve(args.dataset)
    model, tokenizer, path = load_model(args.model)
    check_seqlen(model, args.seqlen)
    windows = eval_windows(args.dataset, tokenizer, seqlen=args.seqlen, max_windows=args.max_windows)
    trace = record_trace(model, windows, path.name, source=f"hf-hooks on {args.dataset}")
    save_trace(args.output, trace)
    return trace


def cmd_trace(args: argparse.Namespace) -> None:
    trace = _record_trace(args)
    print(f"wrote {args.output}: {trace.num_tokens} tokens x {trace.meta.layers} layers x top-{trace.meta.top_k}")


def cmd_profile(args: argparse.Namespace) -> None:
    import numpy as np

    from haq.runtime.placement import expert_frequencies, path_statistics

    trace = _record_trace(args)
    freq = expert_frequencies(trace)
    paths = path_statistics(trace, args.path_window)
    skew = [float(row.max() / max(row.min(), 1)) for row in freq]
    top = np.sort(paths.counts)[::-1]
    covered = top[: max(1, len(top) // 10)].sum() / max(top.sum(), 1)
    print(f"wrote {args.output}: {trace.num_tokens} tokens; per-layer expert frequency max/min "
          f"{min(skew):.2f}..{max(skew):.2f}; {len(top)} distinct {args.path_window}-layer paths, "
          f"the top 10% cover {covered:.1%} of token-paths")
    if args.plot:
        from haq.sim.plots import plot_expert_heatmap

        print(f"wrote {plot_expert_heatmap(trace, Path(args.plot) / 'expert_heatmap.png')}")


def cmd_simulate(args: argparse.Namespace) -> None:
    from haq.api import parse_budget
    from haq.runtime.hardware import load_profile
    from haq.runtime.synthetic import (MIXTRAL_EXPERT_BYTES, MIXTRAL_EXPERT_FLOPS, MIXTRAL_NONEXPERT_BYTES_PER_LAYER,
                                       generate_synthetic_trace, load_fiddler_ranking)
    from haq.runtime.trace import load_trace
    from haq.sim.tuning import format_table, simulate

    mixtral = args.trace == "synthetic-mixtral"
    trace = generate_synthetic_trace(num_sequences=16, seq_len=256, seed=0) if mixtral else load_trace(args.trace)
    hardware = load_profile(args.hardware)
    costs = None if mixtral else hardware.model_costs  # measured for the traced model by `haq profile-hw MODEL`
    expert_bytes = args.expert_bytes if args.expert_bytes is not None else (
        MIXTRAL_EXPERT_BYTES if mixtral else costs.expert_bytes if costs else None)
    if args.prefill < 0:
        raise HaqError(f"--prefill must be >= 0 tokens, got {args.prefill}")
    if args.decode_batch < 1:
        raise HaqError(f"--decode-batch must be >= 1 sequences, got {args.decode_batch}")
    if expert_bytes is not None and expert_bytes < 1:
        raise HaqError(f"--expert-bytes must be >= 1, got {expert_bytes}")
    if not expert_bytes:
        raise HaqError("--expert-bytes is needed for a trace of another model: `haq profile-hw MODEL -o PROFILE` "
                       "measures it (with the rest of a decode step), then pass --hardware PROFILE")
    if not mixtral and costs is None:
        print(f"note: {args.hardware} has no measured model costs, so the prediction counts expert calls only "
              "(no attention, norms or dispatch): `haq profile-hw MODEL -o PROFILE` measures them", file=sys.stderr)
    total = expert_bytes * trace.meta.layers * trace.meta.num_experts
    budgets = [parse_budget(b, total) for b in args.gpu_budget]
    for text, budget in zip(args.gpu_budget, budgets):
        if budget > total:
            print(f"note: --gpu-budget {text} holds every expert of the trace ({total / 2**20:.1f} MiB): "
                  "simulated as 100%", file=sys.stderr)
    budgets = [min(b, total) for b in budgets]
    twice = next((b for i, b in enumerate(budgets) if b in budgets[:i]), None)
    if twice is not None:  # the same text twice, or two that come to the same bytes (capped at every expert)
        raise HaqError(f"--gpu-budget {' '.join(args.gpu_budget)}: two of them are the same budget ({twice} bytes"
                       f"{', every expert' if twice == total else ''}): give each budget once")
    rows = simulate(trace, hardware, budgets, expert_bytes, args.policies,
                    flops_per_token=MIXTRAL_EXPERT_FLOPS if mixtral else costs.flops_per_token if costs else None,
                    nonexpert_bytes_per_layer=MIXTRAL_NONEXPERT_BYTES_PER_LAYER if mixtral else 0,
                    nonexpert_s_per_layer=costs.nonexpert_s_per_layer.value if costs else None,
                    prefill_tokens=args.prefill, decode_batch=args.decode_batch, prefetch=args.prefetch,
                    ranking=load_fiddler_ranking() if mixtral else None)
    print(format_table(rows))
    if args.json:
        _write_json(args.json, {"trace": args.trace, "hardware": args.hardware,
                                "rows": [{**{k: v for k, v in vars(r).items() if k not in ("latency_s", "cum_hit_rate")},
                                          "layer_hit_rate": [round(float(x), 5) for x in r.layer_hit_rate]}
                                         for r in rows]})
    if args.plot:
        from haq.sim.plots import plot_expert_heatmap, plot_hit_rate, plot_latency_cdf

        folder = Path(args.plot)
        for path in (plot_hit_rate(rows, folder / "hit_rate.png"), plot_latency_cdf(rows, folder / "latency_cdf.png"),
                     plot_expert_heatmap(trace, folder / "expert_heatmap.png")):
            print(f"wrote {path}")


def _engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu-budget", default="0", help="device bytes for experts: 6GiB, 512MB, 123456 or 25%%")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--policy", default="haq", help="offloading policy")
    p.add_argument("--hardware", help="hardware preset or profile JSON (default: measure this machine)")
    p.add_argument("--profile", help="routing trace (.npz) for placement (default: recorded on wiki-offline train)")
    add_threads_option(p)


def _int8_backend_option(p: argparse.ArgumentParser) -> None:
    from haq.kernels.backends import backend_names

    p.add_argument("--int8-backend", choices=backend_names(), default=None,
                   help="int8 GEMM backend of a quantized checkpoint (default: the one it records, normally auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="haq", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    p = sub.add_parser("zoo", help="bundled models: list or build")
    zsub = p.add_subparsers(dest="zoo_cmd", metavar="{list,build}", required=True)
    zsub.add_parser("list", help="list the zoo")
    b = zsub.add_parser("build", help="build zoo models locally (no hub)")
    b.add_argument("names", nargs="+", help="zoo names (`haq zoo list`)")
    b.add_argument("--force", action="store_true", help="rebuild even if built")
    p.set_defaults(func=cmd_zoo)

    p = sub.add_parser("quantize", help="post-training quantization (W8A8: adaptive smoothing + GPTQ)",
                       description="Flags set recipe fields; --recipe FILE sets them from YAML or JSON (the flags "
                                   "given win). The defaults shown are the recipe's.")
    p.add_argument("model", help="model folder or zoo name")
    p.add_argument("--recipe", metavar="FILE", help="recipe fields from a YAML or JSON file (unknown fields refused)")
    add_recipe_flags(p)
    p.add_argument("--calib", default="wiki-offline", help="wiki-offline | wikitext2 | c4 | PATH (default: %(default)s)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default: %(default)s)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="calibration window sampling seed (default: %(default)s)")
    p.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                   help="read one decoder layer at a time from the safetensors shards, so host memory holds one "
                        "layer, not the model (default: when the float32 model would fill over half the free RAM)")
    p.add_argument("--device", default="cpu", help="where each decoder layer is calibrated: cpu or cuda[:N] (the "
                   "layer and the activations on the GPU, the model in host memory) (default: %(default)s)")
    p.add_argument("-o", "--output", required=True, help="output checkpoint folder")
    add_threads_option(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export", help="write a W8A8 checkpoint in another engine's format (vLLM: compressed-tensors)")
    p.add_argument("checkpoint", help="haq checkpoint folder (from `haq quantize`)")
    p.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors"],
                   help="compressed-tensors int-quantized: int8 per-channel weights, dynamic per-token activations")
    p.add_argument("-o", "--output", required=True, help="output folder (replaced atomically)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="generate with experts offloaded between CPU and device, with metrics")
    p.add_argument("model", help="MoE model folder, haq checkpoint or zoo name")
    _engine_options(p)
    p.add_argument("--prompt", action="append", help="prompt text; repeat for several, decoded as one batch "
                                                     "(default: 'The history of')")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: fresh entropy)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    _int8_backend_option(p)
    p.add_argument("--json", help="write the metrics as JSON")
    p.add_argument("--plot", help="folder for PNG plots")
    p.set_defaults(func=engine_commands.cmd_run)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming, metrics)")
    p.add_argument("model", help="model folder, haq checkpoint or zoo name (MoE models are offloaded)")
    _engine_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond this get 429")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens prefilled per step: smaller "
                   "keeps the running requests' inter-token latency lower while new ones join, at some TTFT")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request gets 408")
    p.add_argument("--chat-template", help="Jinja chat template file (default: the tokenizer's)")
    p.add_argument("--served-model-name", help="the model id clients send (default: the folder name)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="a request's tokens never depend on its batch (fixed-size float GEMMs; slower)")
    _int8_backend_option(p)
    p.set_defaults(func=engine_commands.cmd_serve)

    p = sub.add_parser("trace", help="record expert routing on a dataset into a .npz trace")
    p.add_argument("model", help="MoE model folder, haq checkpoint or zoo name")
    p.add_argument("--dataset", default="wiki-offline", help="wiki-offline | wikitext2 | c4 | PATH")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    p.add_argument("--max-windows", type=int, default=16, help="windows traced")
    p.add_argument("-o", "--output", required=True, help="the trace file (.npz)")
    add_threads_option(p)
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("profile", help="expert activation statistics and paths on a dataset (writes a trace)")
    p.add_argument("model", help="MoE model folder, haq checkpoint or zoo name")
    p.add_argument("--dataset", default="wiki-offline", help="wiki-offline | wikitext2 | c4 | PATH")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    p.add_argument("--max-windows", type=int, default=16, help="windows traced")
    p.add_argument("--path-window", type=int, default=2, help="earlier layers a path statistic conditions on (1-4)")
    p.add_argument("-o", "--output", required=True, help="routing trace .npz (usable as `haq run --profile`)")
    p.add_argument("--plot", help="folder for the expert heat map PNG")
    add_threads_option(p)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("simulate", help="compare offloading policies on a routing trace")
    p.add_argument("trace", help="trace .npz, or synthetic-mixtral (labelled synthetic, Mixtral-8x7B scale)")
    p.add_argument("--hardware", default="rtx4090-pcie4", help="preset or profile JSON")
    p.add_argument("--gpu-budget", nargs="+", default=["25%", "50%", "75%"], help="device budgets to simulate")
    p.add_argument("--expert-bytes", type=int, help="bytes of one expert (default: Mixtral's for synthetic-mixtral)")
    p.add_argument("--policies", nargs="+",
                   default=["all-cpu", "transfer-always", "lru", "fiddler", "llamacpp", "haq", "belady"])
    p.add_argument("--prefill", type=int, default=0, help="simulate a prompt of this many tokens per sequence")
    p.add_argument("--decode-batch", type=int, default=1, help="sequences decoded together, one token each per step")
    p.add_argument("--prefetch", choices=["auto", "path", "pregate", "oracle", "off"], default="auto",
                   help="haq's prefetch predictions: the trace's recorded pre-gate, profile paths, the oracle "
                        "(the replayed routing: a ceiling), off; auto: pregate when recorded, else path")
    p.add_argument("--json", help="write the results as JSON")
    p.add_argument("--plot", help="folder for PNG plots")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("profile-hw", help="measure expert call and copy times on this machine")
    p.add_argument("model", help="MoE model whose expert shape is measured")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (the median is kept)")
    p.add_argument("-o", "--output", required=True, help="the hardware profile (JSON)")
    add_threads_option(p)
    p.set_defaults(func=engine_commands.cmd_profile_hw)

    p = sub.add_parser("eval", help="perplexity on non-overlapping windows (GPTQ protocol)")
    p.add_argument("model", help="model folder, quantized checkpoint or zoo name")
    p.add_argument("--dataset", default="wiki-offline", help="wiki-offline | wikitext2 | c4 | c4-new | PATH")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window")
    p.add_argument("--max-windows", type=int, default=None, help="windows evaluated (default: all)")
    _int8_backend_option(p)
    p.add_argument("--json", help="also write the result as JSON to this file")
    add_threads_option(p)
    p.set_defaults(func=cmd_eval)
    return parser


FILE_OUTPUTS = {"trace": ".npz", "profile": ".npz", "profile-hw": ".json"}  # each command's --output, by kind


def _check_output_files(args: argparse.Namespace) -> None:
    """Result files are checked before the computation, so a bad path never loses a result."""
    from haq.io import check_output_file

    if getattr(args, "json", None):
        check_output_file(Path(args.json), "--json")
    if args.cmd in FILE_OUTPUTS:
        output, suffix = Path(args.output), FILE_OUTPUTS[args.cmd]
        check_output_file(output, "--output")
        if output.suffix != suffix:  # the readers (simulate, --hardware) go by content, a person by the name
            raise HaqError(f"--output {output}: `haq {args.cmd}` writes a {suffix} file; name it "
                           f"{output.with_suffix(suffix)}")
    if getattr(args, "plot", None) and Path(args.plot).exists() and not Path(args.plot).is_dir():
        raise HaqError(f"--plot {args.plot} is a file: give a folder for the PNG plots")


def _quiet_transformers() -> None:
    """haq shows its own progress; transformers' per-shard bars would bury it. Its warnings stay
    (a config it had to fix, weights it could not use): haq refuses what does not load whole."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "device", "unset") is None:
        from haq.api import default_device

        args.device = default_device()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    _quiet_transformers()
    try:
        _check_output_files(args)
        apply_threads(args)
        args.func(args)
    except HaqError as exc:
        if args.verbose:
            raise
        print(f"haq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what a write left half-done is removed; quantize resumes on a rerun
        print("haq: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `haq zoo list | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0

