"""`haq run` and `haq serve`: generation on the offloading engine, from the command line or over HTTP;
`haq profile-hw`: the machine and model costs the engine's policies (and the simulator) decide with."""
from __future__ import annotations

import argparse
import sys

from haq.errors import HaqError


def write_json(path: str, payload: dict) -> None:
    """Write `payload` atomically and say so."""
    import json
    from pathlib import Path

    from haq.io import atomic_write_text

    atomic_write_text(Path(path), json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


def _check_run_args(args: argparse.Namespace) -> None:
    """Everything `run` and `serve` can check before a model is loaded or a machine profiled."""
    from haq.runtime.policies import policy_names

    if args.policy not in policy_names():
        raise HaqError(f"--policy {args.policy!r} is unknown; choose from {', '.join(policy_names())}")
    from haq.api import check_device, parse_budget

    check_device(args.device)
    parse_budget(args.gpu_budget, 1)  # the syntax; the bytes it means need the model
    if getattr(args, "max_batch", 1) < 1:
        raise HaqError(f"--max-batch must be >= 1, got {args.max_batch}")


def _check_listen(host: str, port: int) -> None:
    """The address `serve` listens on, tried before the model loads (minutes for a large one)."""
    import socket

    if not 0 <= port <= 65535:
        raise HaqError(f"--port {port}: a port is in 0-65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise HaqError(f"--host {host}: not a name or address this machine can resolve ({exc.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise HaqError(f"cannot listen on {host}:{port} ({exc.strerror}): choose another --port, or a --host "
                           "of this machine") from None


def _device_line(device: str) -> str:
    if device == "cpu":
        return "device: cpu (no GPU: the host CPU stands in for the GPU; 'device' experts are copies in host memory)"
    import torch

    return f"device: {device} ({torch.cuda.get_device_name(device)})"


def cmd_run(args: argparse.Namespace) -> None:
    from haq.api import open_engine
    from haq.runtime.generation import check_request
    from haq.runtime.sampling import SamplingParams
    from haq.serve import eos_ids

    _check_run_args(args)
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    prompts = args.prompt or ["The history of"]
    print(_device_line(args.device), file=sys.stderr)
    engine, tokenizer = open_engine(args.model, args.gpu_budget, device=args.device, policy=args.policy,
                                    hardware=args.hardware, profile=args.profile, int8_backend=args.int8_backend)
    if args.chat and not getattr(tokenizer, "chat_template", None):
        engine.close()
        raise HaqError(f"{args.model} has no chat template: drop --chat")
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                         return_dict=False) if args.chat else tokenizer(p)["input_ids"]
           for p in prompts]
    config = engine.model.config
    for prompt in ids:  # before any text is shown
        try:
            check_request(prompt, params, getattr(config, "vocab_size", None),
                          getattr(config, "max_position_embeddings", None))
        except HaqError:
            engine.close()
            raise
    streams = {i: [] for i in range(len(prompts))}
    shown = {i: 0 for i in range(len(prompts))}
    single = len(prompts) == 1
    if single:  # the answer continues the prompt's text; after a chat turn, on its own line
        print(prompts[0], end="\n" if args.chat else "", flush=True)

    def decode(tokens: list[int]) -> str:  # no clean-up: BPE tokenizers warn about it mid-stream
        return tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def show(event) -> None:  # one prompt: stream its text; several: print each when it ends
        streams[event.seq_id].append(event.token)
        text = decode(streams[event.seq_id])
        if single and not text.endswith("\ufffd"):
            print(text[shown[event.seq_id]:], end="", flush=True)
            shown[event.seq_id] = len(text)
        elif not single and event.finish_reason is not None:
            print(f"[{event.seq_id}] {prompts[event.seq_id]}{text}  ({event.finish_reason})")

    try:
        _, metrics = engine.generate_batch(ids, params, max_batch=args.max_batch, eos_token_ids=eos_ids(tokenizer, engine.model),
                                           on_token=show)
    finally:
        engine.close()
    if single:
        print(decode(streams[0])[shown[0]:])  # what was held back, if any
    print(metrics.summary())
    if args.json:
        write_json(args.json, metrics.to_dict())
    if args.plot:
        from haq.sim.plots import plot_engine_run

        for path in plot_engine_run(metrics, args.plot):
            print(f"wrote {path}")


def cmd_serve(args: argparse.Namespace) -> None:
    import signal

    import uvicorn

    from haq.serve import build_server

    _check_run_args(args)
    _check_listen(args.host, args.port)
    print(_device_line(args.device), file=sys.stderr)
    server = build_server(args.model, args.gpu_budget, device=args.device, policy=args.policy,
                          hardware=args.hardware, profile=args.profile, max_batch=args.max_batch,
                          max_queue=args.max_queue, request_timeout=args.request_timeout,
                          chat_template=args.chat_template, batch_invariant=args.batch_invariant,
                          served_name=args.served_model_name, int8_backend=args.int8_backend,
                          prefill_chunk=args.prefill_chunk)
    print(f"serving {server.model_name} on http://{args.host}:{args.port}/v1 (max batch {args.max_batch})",
          file=sys.stderr)
    # uvicorn drains running requests on SIGTERM, then re-raises the signal to the handler it found:
    # make that one a no-op, so a drained shutdown exits 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(server.app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30)
    print("drained and stopped", file=sys.stderr)


def cmd_profile_hw(args: argparse.Namespace) -> None:
    import dataclasses

    import torch

    from haq.api import build_engine, check_device, profile_trace_for
    from haq.models.adapters import adapter_for
    from haq.loading import load_model
    from haq.runtime.hardware import ModelCosts, Quantity
    from haq.runtime.profile_hw import measure_overhead_s_per_layer, profile_hardware
    from haq.runtime.store import extract_experts

    if args.repeats < 1:
        raise HaqError(f"--repeats must be >= 1, got {args.repeats}")
    check_device(args.device)
    model, tokenizer, path = load_model(args.model)
    adapter = adapter_for(model.config)
    if adapter.moe is None:
        raise HaqError(f"{path} is a dense model: profile-hw measures expert calls of an MoE model")
    first = adapter.decoder_layers(model)[adapter.moe_layers(model.config)[0]]
    weights, math = extract_experts(first.get_submodule(adapter.moe.experts))
    profile = profile_hardware(weights[0], math, device=args.device, repeats=args.repeats)
    # the rest of a decode step, per layer, on this model: what the simulator adds to expert times
    trace = profile_trace_for(model, tokenizer, path.name, windows=1, seqlen=64)
    engine = build_engine(model, budget_bytes=0, hardware=profile, policy="all-cpu", profile=trace,
                          device=args.device or "cpu")
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    nonexpert = measure_overhead_s_per_layer(engine, prompt, steps=max(8, args.repeats))
    engine.close()
    flops = 2.0 * (weights[0].gate_up.numel() + weights[0].down.numel())
    source = (f"measured: median decode step of {path.name} with expert math taken out (attention, norms, router, "
              f"dispatch), per layer, on {args.device or 'cpu'}")
    profile = dataclasses.replace(profile, model_costs=ModelCosts(path.name, weights[0].nbytes, flops,
                                                                  Quantity(nonexpert, "s", source)))
    profile.save(args.output)
    print(profile.summary())
    print(f"wrote {args.output} (each figure with how it was measured); `haq simulate TRACE --hardware "
          f"{args.output}` replays a trace of {path.name} with them")
