"""Fault cases about arguments: runtime flags (budgets, token counts, prompts, policies, hardware
profiles, routing traces, devices), numeric options of every command, and Python API calls with
wrong types or values."""
from __future__ import annotations

import json
from pathlib import Path

from tests.faults.catalogue import Case, Fixtures

RUN = ["run", "{mixtral}", "--max-new-tokens", "2", "--hardware", "rtx4090-pcie4", "--profile", "{trace}",
       "--threads", "1"]


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "m.json").read_text())


def _write(name: str, data: bytes | str):
    def setup(fx: Fixtures, folder: Path) -> None:
        (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return setup


def _hw(edit) -> bytes:
    from haq.runtime.hardware import load_profile

    data = load_profile("rtx4090-pcie4").to_dict()
    edit(data)
    return json.dumps(data).encode()


def _trace_file(name: str, make):
    def setup(fx: Fixtures, folder: Path) -> None:
        import numpy as np

        with np.load(fx.trace) as npz:
            arrays = {k: npz[k] for k in npz.files}
        np.savez(folder / name, **make(arrays))
    return setup


def _set(d: dict, path: str, value):
    *head, last = path.split(".")
    for key in head:
        d = d[key]
    d[last] = value


HARDWARE = {
    "missing-file": None,
    "not-json": b"{hardware",
    "a-list": b"[1]",
    "unknown-key": _hw(lambda d: d.update(turbo=True)),
    "missing-key": _hw(lambda d: d.pop("link")),
    "negative-bw": _hw(lambda d: _set(d, "link.bw.value", -1)),
    "zero-bw": _hw(lambda d: _set(d, "cpu.mem_bw.value", 0)),
    "absurd-bw": _hw(lambda d: _set(d, "cpu.mem_bw.value", 1e300)),
    "absurd-latency": _hw(lambda d: _set(d, "link.latency.value", 1e-300)),
    "string-value": _hw(lambda d: _set(d, "device.int8_ops.value", "fast")),
    "nan": _hw(lambda d: _set(d, "link.bw.value", float("nan"))),
    "model-costs-a-string": _hw(lambda d: d.update(model_costs="fast")),
    "model-costs-missing-key": _hw(lambda d: d.update(model_costs={"model": "m", "expert_bytes": 10})),
    "model-costs-fractional-bytes": _hw(lambda d: d.update(model_costs={
        "model": "m", "expert_bytes": 10.5, "flops_per_token": 20,
        "nonexpert_s_per_layer": {"value": 1e-4, "unit": "s", "source": "x"}})),
    "model-costs-negative-time": _hw(lambda d: d.update(model_costs={
        "model": "m", "expert_bytes": 10, "flops_per_token": 20,
        "nonexpert_s_per_layer": {"value": -1, "unit": "s", "source": "x"}})),
}
TRACES = {
    "other-model": None,  # tiny-qwen2-moe's trace: other layers and experts
    "zero-tokens": lambda a: {**a, "experts": a["experts"][:0], "seq_id": a["seq_id"][:0], "pos": a["pos"][:0]},
    "expert-out-of-range": lambda a: {**a, "experts": a["experts"] + 1000},
    "missing-array": lambda a: {k: v for k, v in a.items() if k != "pos"},
    "extra-array": lambda a: {**a, "junk": a["pos"]},
    "wrong-top-k": lambda a: {**a, "experts": a["experts"][:, :, :1]},
}


def runtime_cases() -> list[Case]:
    with_json = [*RUN, "--json", "{case}/m.json"]
    cases = [Case(f"run-budget-{label}", "runtime", "error", [*RUN, "--gpu-budget", value])
             for label, value in (("negative", "-1"), ("word", "abc"), ("over-100pc", "200%"), ("unit", "5XB"),
                                  ("empty", ""), ("two-values", "1GB 2GB"), ("pc-negative", "-5%"),
                                  ("fraction-of-a-byte", "0.5"))]
    cases += [
        Case("run-budget-0-moves-nothing", "runtime", "ok", [*with_json, "--gpu-budget", "0"],
             check=lambda v, fx, f: _metrics(f)["bytes_moved_per_token"] == 0 and _metrics(f)["cpu_share"] == 1.0),
        Case("run-budget-100pc", "runtime", "ok", [*with_json, "--gpu-budget", "100%"],
             check=lambda v, fx, f: _metrics(f)["budget_bytes"] == _metrics(f)["total_expert_bytes"]),
        Case("run-budget-beyond-device-memory", "runtime", "error", [*RUN, "--gpu-budget", "900GiB"]),
        Case("run-budget-above-all-experts", "runtime", "ok", [*with_json, "--gpu-budget", "1GiB"],
             check=lambda v, fx, f: _metrics(f)["device_bytes"].get("experts_peak", 0) <= _metrics(f)["budget_bytes"]),
        Case("run-budget-25pc-within", "runtime", "ok", [*with_json, "--gpu-budget", "25%"],
             check=lambda v, fx, f: _metrics(f)["device_bytes"].get("experts_peak", 0) <= _metrics(f)["budget_bytes"]),
    ]
    for value in ("0", "-5", "100000", "abc"):
        cases.append(Case(f"run-max-new-tokens-{value}", "runtime", "error", [*RUN[:2], "--max-new-tokens", value,
                                                                             *RUN[4:]]))
    cases.append(Case("run-max-new-tokens-1", "runtime", "ok", [*RUN[:2], "--max-new-tokens", "1", *RUN[4:]]))
    cases += [
        Case("serve-port-out-of-range", "runtime", "error", ["serve", "{mixtral}", "--port", "70000"]),
        Case("serve-host-unresolvable", "runtime", "error", ["serve", "{mixtral}", "--host", "999.1.1.1"]),
        Case("serve-prefill-chunk-0", "runtime", "error", ["serve", "{mixtral}", "--prefill-chunk", "0", "--threads",
                                                            "1", "--hardware", "rtx4090-pcie4", "--profile", "{trace}"]),
        Case("run-prompt-empty", "runtime", "error", [*RUN, "--prompt", ""]),
        Case("run-prompt-beyond-context", "runtime", "error", [*RUN, "--prompt", "word " * 5000]),
        Case("run-two-prompts", "runtime", "ok", [*RUN, "--prompt", "One", "--prompt", "Two"]),
        Case("run-prompt-unicode", "runtime", "ok", [*RUN, "--prompt", "naïve café 東京 🙂"]),
        Case("run-policy-unknown", "runtime", "error", [*RUN, "--policy", "magic"]),
        Case("run-policy-fiddler-list-no-ranking", "runtime", "error", [*RUN, "--policy", "fiddler-list"]),
        Case("run-threads-0", "runtime", "error", [*RUN, "--threads", "0"]),
        Case("eval-threads-0", "runtime", "error", ["eval", "{llama}", "--threads", "0"]),
        Case("eval-threads-1", "runtime", "ok", ["eval", "{llama}", "--threads", "1", "--seqlen", "32",
                                                "--max-windows", "1"]),
        Case("run-max-batch-0", "runtime", "error", [*RUN, "--max-batch", "0"]),
        Case("run-temperature-negative", "runtime", "error", [*RUN, "--temperature", "-1"]),
        Case("run-temperature-huge", "runtime", "error", [*RUN, "--temperature", "50"]),
        Case("run-top-p-0", "runtime", "error", [*RUN, "--top-p", "0"]),
        Case("run-top-p-above-1", "runtime", "error", [*RUN, "--top-p", "1.5"]),
        Case("run-device-tpu", "runtime", "error", [*RUN, "--device", "tpu"]),
        Case("run-device-cuda-without-gpu", "runtime", "error", [*RUN, "--device", "cuda:7"]),
        Case("run-dense-model", "runtime", "error", ["run", "{llama}", "--max-new-tokens", "2", "--hardware",
                                                     "rtx4090-pcie4"]),
        Case("run-chat-without-template", "runtime", "error", [*RUN, "--chat"]),
        Case("run-hardware-unknown-preset", "runtime", "error", [*RUN, "--hardware", "rtx9090"]),
        Case("run-sampling-seeded", "runtime", "ok", [*RUN, "--temperature", "0.8", "--seed", "3"]),
    ]
    for label, data in HARDWARE.items():
        setup = None if data is None else _write("hw.json", data)
        cases.append(Case(f"run-hardware-{label}", "runtime", "error", [*RUN, "--hardware", "{case}/hw.json"],
                          setup=setup))
        cases.append(Case(f"simulate-hardware-{label}", "runtime", "error",
                          ["simulate", "synthetic-mixtral", "--policies", "lru", "--hardware", "{case}/hw.json"],
                          setup=setup))
    for label, make in TRACES.items():
        if make is None:
            args, setup = [*RUN[:-4], "--profile", "{trace_other}", "--threads", "1"], None
        else:
            args, setup = [*RUN[:-4], "--profile", "{case}/t.npz", "--threads", "1"], _trace_file("t.npz", make)
        cases.append(Case(f"run-profile-{label}", "runtime", "error", args, setup=setup))
    cases += [
        Case("run-profile-not-npz", "runtime", "error", [*RUN[:-4], "--profile", "{case}/t.npz"],
             setup=_write("t.npz", "not a zip")),
        Case("run-profile-missing", "runtime", "error", [*RUN[:-4], "--profile", "{case}/none.npz"]),
        Case("simulate-trace-missing", "runtime", "error", ["simulate", "{case}/none.npz"]),
        Case("simulate-trace-malformed", "runtime", "error", ["simulate", "{case}/t.npz", "--expert-bytes", "1000"],
             setup=_trace_file("t.npz", TRACES["expert-out-of-range"])),
        Case("simulate-trace-needs-expert-bytes", "runtime", "error", ["simulate", "{trace}"]),
        Case("simulate-expert-bytes-0", "runtime", "error", ["simulate", "{trace}", "--expert-bytes", "0"]),
        Case("simulate-expert-bytes-negative", "runtime", "error", ["simulate", "{trace}", "--expert-bytes", "-4"]),
        Case("simulate-recorded-trace", "runtime", "ok", ["simulate", "{trace}", "--expert-bytes", "100000",
                                                          "--policies", "lru", "haq"]),
        Case("simulate-budget-twice", "runtime", "error", ["simulate", "synthetic-mixtral", "--policies", "lru",
                                                           "--gpu-budget", "25%", "25%"]),
        Case("simulate-budget-bad", "runtime", "error", ["simulate", "synthetic-mixtral", "--gpu-budget", "lots"]),
        Case("simulate-budgets-both-over-all", "runtime", "error", ["simulate", "synthetic-mixtral", "--policies",
                                                                     "lru", "--gpu-budget", "900GB", "1TB"]),
        Case("simulate-budget-over-all", "runtime", "ok", ["simulate", "synthetic-mixtral", "--policies", "lru",
                                                           "--gpu-budget", "900GB"]),
        Case("simulate-policy-unknown", "runtime", "error", ["simulate", "synthetic-mixtral", "--policies", "magic"]),
        Case("simulate-prefill-negative", "runtime", "error", ["simulate", "synthetic-mixtral", "--policies", "lru",
                                                               "--prefill", "-3"]),
        Case("profile-hw-repeats-0", "runtime", "error", ["profile-hw", "{mixtral}", "--repeats", "0", "-o",
                                                          "{case}/hw.json"]),
        Case("profile-hw-repeats-negative", "runtime", "error", ["profile-hw", "{mixtral}", "--repeats", "-2", "-o",
                                                                 "{case}/hw.json"]),
        Case("profile-hw-device-tpu", "runtime", "error", ["profile-hw", "{mixtral}", "--device", "tpu", "-o",
                                                           "{case}/hw.json"]),
        Case("profile-hw-device-cuda", "runtime", "error", ["profile-hw", "{mixtral}", "--device", "cuda:7", "-o",
                                                            "{case}/hw.json"]),
        Case("profile-hw-dense-model", "runtime", "error", ["profile-hw", "{llama}", "-o", "{case}/hw.json"]),
        Case("trace-dense-model", "runtime", "error", ["trace", "{llama}", "-o", "{case}/t.npz"]),
        Case("trace-output-not-npz", "runtime", "error", ["trace", "{mixtral}", "-o", "{case}/t.txt"]),
        Case("profile-hw-output-not-json", "runtime", "error", ["profile-hw", "{mixtral}", "-o", "{case}/hw"]),
        Case("zoo-build-unknown", "runtime", "error", ["zoo", "build", "tiny-gpt5"]),
        Case("zoo-list-closed-pipe", "runtime", "ok", ["zoo", "list"], inject=_closed_stdout),
    ]
    return cases


def _closed_stdout() -> None:
    """`haq zoo list | head -0`: stdout is a pipe whose reader has gone."""
    import os

    read, write = os.pipe()
    os.close(read)
    os.dup2(write, 1)  # sys.stdout already writes to fd 1


NUMERIC = {
    "eval-seqlen-0": ["eval", "{llama}", "--seqlen", "0"],
    "eval-seqlen-1": ["eval", "{llama}", "--seqlen", "1"],
    "eval-seqlen-negative": ["eval", "{llama}", "--seqlen", "-8"],
    "eval-seqlen-beyond-context": ["eval", "{llama}", "--seqlen", "100000", "--max-windows", "1"],
    "eval-seqlen-word": ["eval", "{llama}", "--seqlen", "long"],
    "eval-max-windows-0": ["eval", "{llama}", "--seqlen", "32", "--max-windows", "0"],
    "eval-int8-backend-unknown": ["eval", "{llama}", "--int8-backend", "cuda-magic"],
    "trace-seqlen-beyond-context": ["trace", "{mixtral}", "--seqlen", "100000", "--max-windows", "1", "-o",
                                    "{case}/t.npz"],
    "trace-max-windows-0": ["trace", "{mixtral}", "--seqlen", "32", "--max-windows", "0", "-o", "{case}/t.npz"],
    "profile-path-window-0": ["profile", "{mixtral}", "--seqlen", "32", "--max-windows", "1", "--path-window", "0",
                              "-o", "{case}/t.npz"],
}
for flag, values in {"--nsamples": ("0", "-1", "100000000"), "--seqlen": ("0", "1", "100000"),
                     "--wbits": ("1", "9", "16"), "--abits": ("0", "1", "12"), "--alpha": ("-0.5", "2"),
                     "--method": ("awq",), "--act": ("per-channel",), "--alpha-search": ("random",)}.items():
    for value in values:
        NUMERIC[f"quantize{flag[1:]}-{value}"] = ["quantize", "{llama}", "--method", "rtn", "--nsamples", "2",
                                                   "--seqlen", "32", "-o", "{case}/q", flag, value]


def numeric_cases() -> list[Case]:
    return [Case(f"arg-{label}", "arguments", "error", args) for label, args in NUMERIC.items()]


def _engine(fx: Fixtures):
    from haq import api

    engine, _ = api.open_engine(str(fx.mixtral), "25%", hardware="rtx4090-pcie4", profile=str(fx.trace))
    return engine


def _api(label: str, fn, expect: str = "error", check=None) -> Case:
    return Case(f"api-{label}", "python api", expect, call=fn, check=check, note=label)


def api_cases() -> list[Case]:
    import torch

    from haq import api
    from haq.quant.recipe import Recipe
    from haq.runtime.sampling import SamplingParams

    def quantize(**kw):
        args = {"model": "tiny-llama", "recipe": Recipe(method="rtn"), "nsamples": 2, "seqlen": 32,
                "progress": False}
        args.update(kw)
        return lambda fx, f: api.quantize(args.pop("model") if args["model"] != "tiny-llama" else str(fx.llama),
                                          args["recipe"], args.get("out", f / "q"),
                                          **{k: v for k, v in args.items() if k not in ("model", "recipe", "out")})

    cases = [
        _api("quantize-model-int", quantize(model=123)),
        _api("quantize-model-none", quantize(model=None)),
        _api("quantize-recipe-string", quantize(recipe="rtn")),
        _api("quantize-recipe-dict", quantize(recipe={"method": "rtn"})),
        _api("quantize-out-int", quantize(out=5)),
        _api("quantize-nsamples-string", quantize(nsamples="2")),
        _api("quantize-nsamples-float", quantize(nsamples=2.0)),
        _api("quantize-seqlen-zero", quantize(seqlen=0)),
        _api("quantize-seed-string", quantize(seed="0")),
        _api("quantize-calib-int", quantize(calib=3)),
        _api("quantize-unknown-keyword", quantize(bits=4)),
        _api("quantize-ok", quantize(), "ok", lambda v, fx, f: (f / "q" / "haq_config.json").is_file()),
        _api("load-none", lambda fx, f: api.load(None)),
        _api("load-int", lambda fx, f: api.load(7)),
        _api("load-missing", lambda fx, f: api.load(str(f / "nope"))),
        _api("open-engine-budget-int", lambda fx, f: api.open_engine(str(fx.mixtral), 25)),
        _api("open-engine-device-int", lambda fx, f: api.open_engine(str(fx.mixtral), "0", device=0)),
        _api("open-engine-policy-unknown", lambda fx, f: api.open_engine(str(fx.mixtral), "0", policy="magic",
                                                                         hardware="rtx4090-pcie4",
                                                                         profile=str(fx.trace))),
        _api("parse-budget-word", lambda fx, f: api.parse_budget("lots", 100)),
        _api("parse-budget-over", lambda fx, f: api.parse_budget("101%", 100)),
        _api("recipe-wbits-string", lambda fx, f: Recipe(wbits="8")),
        _api("recipe-method-int", lambda fx, f: Recipe(method=5)),
        _api("recipe-rotate-int", lambda fx, f: Recipe(rotate=1)),
        _api("recipe-alpha-step-0", lambda fx, f: Recipe(alpha_step=0.0)),
        _api("recipe-percdamp-negative", lambda fx, f: Recipe(percdamp=-0.1)),
        _api("recipe-blocksize-0", lambda fx, f: Recipe(blocksize=0)),
        _api("recipe-unknown-key", lambda fx, f: Recipe.from_dict({"method": "rtn", "bits": 4})),
        _api("sampling-max-tokens-0", lambda fx, f: SamplingParams(max_tokens=0)),
        _api("sampling-temperature-negative", lambda fx, f: SamplingParams(temperature=-1.0)),
        _api("sampling-top-p-0", lambda fx, f: SamplingParams(top_p=0.0)),
        _api("generate-two-rows", lambda fx, f: _engine(fx).generate(torch.ones(2, 4, dtype=torch.long), 2)),
        _api("generate-empty", lambda fx, f: _engine(fx).generate(torch.ones(0, dtype=torch.long), 2)),
        _api("generate-list", lambda fx, f: _engine(fx).generate([1, 2, 3], 2)),
        _api("generate-one-row", lambda fx, f: _engine(fx).generate(torch.ones(1, 4, dtype=torch.long), 2), "ok",
             lambda v, fx, f: len(v[0]) == 2),
        _api("generate-batch-empty-prompt", lambda fx, f: _engine(fx).generate_batch([[]], SamplingParams())),
        _api("generate-batch-negative-id", lambda fx, f: _engine(fx).generate_batch([[-1]], SamplingParams())),
        _api("generate-batch-id-beyond-vocab", lambda fx, f: _engine(fx).generate_batch([[10**9]], SamplingParams())),
        _api("generate-batch-beyond-context",
             lambda fx, f: _engine(fx).generate_batch([[1] * 10], SamplingParams(max_tokens=10**6))),
        _api("load-trace-missing", lambda fx, f: __import__("haq.runtime.trace", fromlist=["x"]).load_trace(f / "x")),
        _api("load-profile-missing", lambda fx, f: __import__("haq.runtime.hardware",
                                                              fromlist=["x"]).load_profile(str(f / "x.json"))),
        _api("profile-from-list", lambda fx, f: __import__("haq.runtime.hardware",
                                                           fromlist=["x"]).profile_from_dict([1, 2])),
        _api("zoo-build-unknown", lambda fx, f: __import__("haq.zoo", fromlist=["x"]).build("tiny-gpt5")),
        _api("export-format-unknown", lambda fx, f: __import__("haq.checkpoint.compressed_tensors", fromlist=["x"])
             .export_checkpoint(fx.ckpt_llama, f / "e", fmt="gguf")),
        _api("eval-windows-seqlen-1", lambda fx, f: __import__("haq.data.windows", fromlist=["x"])
             .eval_windows("wiki-offline", api.load(str(fx.llama))[1], seqlen=1)),
        _api("calib-windows-nsamples-0", lambda fx, f: __import__("haq.data.windows", fromlist=["x"])
             .calib_windows("wiki-offline", api.load(str(fx.llama))[1], nsamples=0, seqlen=32)),
    ]
    return cases


def cases() -> list[Case]:
    return runtime_cases() + numeric_cases() + api_cases()
