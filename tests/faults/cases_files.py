"""Fault cases about files: checkpoints (every file truncated, flipped, emptied or deleted; edited
configs), float model folders that are not what they claim, output locations, input texts."""
from __future__ import annotations

import errno
import json
from pathlib import Path

from tests.faults.catalogue import Case, Fixtures, copy_of, then

CKPT_FILES = ("model.safetensors", "config.json", "haq_config.json", "tokenizer.json", "tokenizer_config.json")
ON_CKPT = {
    "eval": ["eval", "{case}/m", "--seqlen", "32", "--max-windows", "1"],
    "run": ["run", "{case}/m", "--max-new-tokens", "2", "--hardware", "rtx4090-pcie4", "--profile", "{trace}",
            "--threads", "1"],
    "export": ["export", "{case}/m", "-o", "{case}/exp"],
}
QUANTIZE = ["quantize", "{case}/m", "--method", "rtn", "--nsamples", "2", "--seqlen", "32", "-o", "{case}/q"]


def _mutate(name: str, how: str):
    def step(fx: Fixtures, folder: Path) -> None:
        path = folder / "m" / name
        data = path.read_bytes()
        if how == "truncate":
            path.write_bytes(data[: len(data) // 2])
        elif how == "flip":
            i = len(data) // 2
            path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
        elif how == "empty":
            path.write_bytes(b"")
        else:
            path.unlink()
    return step


def _edit_json(name: str, edit):
    def step(fx: Fixtures, folder: Path) -> None:
        path = folder / "m" / name
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
    return step


def _first_spec(meta: dict) -> dict:
    return meta["modules"][next(iter(meta["modules"]))]


HAQ_CONFIG_EDITS = {
    "act-per-tensor": lambda m: m["recipe"].update(act="per-tensor"),
    "method-gptq": lambda m: m["recipe"].update(method="gptq"),
    "spec-shape": lambda m: _first_spec(m).update(in_features=_first_spec(m).get("in_features", 1) * 2),
    "spec-removed": lambda m: m["modules"].pop(next(iter(m["modules"]))),
    "format-v9": lambda m: m.update(format="haq-int8-v9"),
    "no-self-checksum": lambda m: m.pop("config_sha256"),
    "no-files": lambda m: m.pop("files"),
    "weights-checksum": lambda m: m["files"].update({"model.safetensors": "0" * 64}),
    "extra-key": lambda m: m.update(comment="edited by hand"),
    "not-an-object": None,
}
CONFIG_EDITS = {
    "layers-halved": lambda c: c.update(num_hidden_layers=max(1, c["num_hidden_layers"] // 2)),
    "model-type-llama": lambda c: c.update(model_type="llama"),
    "hidden-size": lambda c: c.update(hidden_size=c["hidden_size"] * 2),
    "rope-theta": lambda c: c.update(rope_theta=1.0),
}


def checkpoint_cases() -> list[Case]:
    cases = []
    for name in CKPT_FILES:
        for how in ("truncate", "flip", "empty", "delete"):
            for cmd, args in ON_CKPT.items():
                cases.append(Case(f"ckpt-{name}-{how}-{cmd}", "checkpoint", "error", args,
                                  setup=then(copy_of("ckpt"), _mutate(name, how))))
    for label, edit in HAQ_CONFIG_EDITS.items():
        step = _write("haq_config.json", b"[1, 2, 3]") if edit is None else _edit_json("haq_config.json", edit)
        for cmd, args in ON_CKPT.items():
            cases.append(Case(f"haq-config-{label}-{cmd}", "checkpoint", "error", args,
                              setup=then(copy_of("ckpt"), step)))
    for label, edit in CONFIG_EDITS.items():
        for cmd, args in ON_CKPT.items():
            cases.append(Case(f"ckpt-config-{label}-{cmd}", "checkpoint", "error", args,
                              setup=then(copy_of("ckpt"), _edit_json("config.json", edit))))
    for cmd in ("eval", "export"):  # a copy that lost haq_config.json; a killed save's temp folder
        cases.append(Case(f"ckpt-orphaned-weights-{cmd}", "checkpoint", "error", ON_CKPT[cmd],
                          setup=then(copy_of("ckpt"), _mutate("haq_config.json", "delete"))))
    cases.append(Case("ckpt-quantize-again", "checkpoint", "error", QUANTIZE, setup=copy_of("ckpt")))
    cases.append(Case("ckpt-intact-eval", "checkpoint", "ok", ON_CKPT["eval"], setup=copy_of("ckpt")))
    cases.append(Case("ckpt-intact-export", "checkpoint", "ok", ON_CKPT["export"], setup=copy_of("ckpt"),
                      check=lambda v, fx, f: (f / "exp" / "config.json").is_file()))
    on_export = ["eval", "{case}/m", "--seqlen", "32", "--max-windows", "1"]  # haq's reader of its vLLM export
    cases.append(Case("export-intact-eval", "checkpoint", "ok", on_export, setup=copy_of("export")))
    for how in ("truncate", "flip", "delete"):
        cases.append(Case(f"export-weights-{how}-eval", "checkpoint", "error", on_export,
                          setup=then(copy_of("export"), _mutate("model.safetensors", how))))
    cases.append(Case("export-scheme-float-eval", "checkpoint", "error", on_export, setup=then(copy_of("export"),
                      _edit_json("config.json", lambda c: c["quantization_config"].update(format="float-quantized")))))
    return cases


def _write(name: str, data: bytes):
    def step(fx: Fixtures, folder: Path) -> None:
        (folder / "m" / name).write_bytes(data)
    return step


def _drop_tensor(extra: bool):
    def step(fx: Fixtures, folder: Path) -> None:
        from safetensors.torch import load_file, save_file
        import torch

        path = folder / "m" / "model.safetensors"
        state = load_file(path)
        if extra:
            state["model.layers.0.surprise.weight"] = torch.zeros(2, 2)
        else:
            state.pop(next(k for k in state if "layers.0" in k and "proj" in k))
        save_file(state, path, metadata={"format": "pt"})
    return step


FLOAT_FAULTS = {
    "weights-deleted": _mutate("model.safetensors", "delete"),
    "weights-truncated": _mutate("model.safetensors", "truncate"),
    "weights-flipped-header": lambda fx, f: _write("model.safetensors", b"\xff" * 16 +
                                                   (f / "m" / "model.safetensors").read_bytes()[16:])(fx, f),
    "tensor-missing": _drop_tensor(extra=False),
    "tensor-extra": _drop_tensor(extra=True),
    "config-hidden-size": _edit_json("config.json", CONFIG_EDITS["hidden-size"]),
    "config-layers-doubled": _edit_json("config.json", lambda c: c.update(num_hidden_layers=c["num_hidden_layers"] * 2)),
    "config-not-json": _write("config.json", b"{not json"),
    "config-a-list": _write("config.json", b"[1, 2]"),
    "config-no-model-type": _edit_json("config.json", lambda c: c.pop("model_type")),
    "config-bert": _edit_json("config.json", lambda c: c.update(model_type="bert")),
    "config-rope-scaling-float": _edit_json("config.json", lambda c: c.update(rope_scaling=1.5)),
    "config-vocab-string": _edit_json("config.json", lambda c: c.update(vocab_size="many")),
    "config-quantization-string": _edit_json("config.json", lambda c: c.update(quantization_config="int8")),
    "config-quantization-gptq": _edit_json("config.json", lambda c: c.update(
        quantization_config={"quant_method": "gptq", "bits": 4})),
    "config-deleted": _mutate("config.json", "delete"),
    "tokenizer-deleted": then(_mutate("tokenizer.json", "delete"), _mutate("tokenizer_config.json", "delete")),
    "tokenizer-corrupt": _write("tokenizer.json", b"{\"version\": broken"),
}
ON_FLOAT = {"eval": ["eval", "{case}/m", "--seqlen", "32", "--max-windows", "1"], "quantize": QUANTIZE}


def _relabel_gemma(fx: Fixtures, folder: Path) -> None:
    copy_of("gemma")(fx, folder)
    _edit_json("config.json", lambda c: c.update(model_type="llama"))(fx, folder)


def model_cases() -> list[Case]:
    cases = []
    for label, step in FLOAT_FAULTS.items():
        for cmd, args in ON_FLOAT.items():
            cases.append(Case(f"model-{label}-{cmd}", "model folder", "error", args,
                              setup=then(copy_of("llama"), step)))
    for cmd, args in ON_FLOAT.items():
        cases.append(Case(f"model-gemma3-relabelled-llama-{cmd}", "model folder", "error", args, setup=_relabel_gemma))
        cases.append(Case(f"model-not-a-folder-{cmd}", "model folder", "error", args,
                          setup=lambda fx, f: (f / "m").write_text("a file")))
        cases.append(Case(f"model-unknown-name-{cmd}", "model folder", "error", [a.replace("{case}/m", "no-such-model")
                                                                               for a in args]))
    return cases


def _enospc_safetensors() -> None:
    """safetensors' writer fails half-way, as on a full disk."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    safetensors.torch.save_file = save_file


def _enospc_fsync() -> None:
    import os

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    os.fsync = fsync


def _read_only() -> None:
    """Creating a file or a folder fails as on a read-only mount (an existing folder still exists)."""
    import os

    real_open, real_mkdir = os.open, os.mkdir

    def mkdir(path, *args, **kwargs):
        if os.path.exists(path):
            return real_mkdir(path, *args, **kwargs)  # FileExistsError, as the kernel says first
        raise OSError(errno.EROFS, "Read-only file system")

    def open_(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *args, **kwargs)

    os.mkdir, os.open = mkdir, open_


def _user_files(out: str):
    def step(fx: Fixtures, folder: Path) -> None:
        (folder / out).mkdir(parents=True, exist_ok=True)
        (folder / out / "notes.txt").write_text("mine")
        (folder / out / "sub").mkdir(exist_ok=True)
        (folder / out / "sub" / "x.txt").write_text("mine too")
    return step


def _loads_as_checkpoint(out: str):
    def check(value, fx: Fixtures, folder: Path) -> bool:
        from haq.checkpoint.native import load_quantized

        return load_quantized(folder / out) is not None
    return check


def output_cases() -> list[Case]:
    quantize = ["quantize", "{llama}", "--method", "rtn", "--nsamples", "2", "--seqlen", "32", "-o"]
    export = ["export", "{ckpt_llama}", "-o"]
    cases = []
    for cmd, base, check in (("quantize", quantize, _loads_as_checkpoint("out")),
                             ("export", export, lambda v, fx, f: (f / "out" / "config.json").is_file())):
        out = [*base, "{case}/out"]
        previous = copy_of("ckpt_llama" if cmd == "quantize" else "export", "out")
        cases += [
            Case(f"out-{cmd}-is-a-file", "outputs", "error", out,
                 setup=lambda fx, f: (f / "out").write_text("a file"), keep=["out"]),
            Case(f"out-{cmd}-holds-user-files", "outputs", "error", out, setup=_user_files("out"),
                 keep=["out/notes.txt", "out/sub/x.txt"]),
            Case(f"out-{cmd}-previous-output-replaced", "outputs", "ok", out, setup=previous, check=check),
            Case(f"out-{cmd}-previous-output-with-user-file", "outputs", "error", out,
                 setup=then(previous, lambda fx, f: (f / "out" / "notes.txt").write_text("mine")),
                 keep=["out/notes.txt", "out/model.safetensors"]),
            Case(f"out-{cmd}-missing-parent", "outputs", "ok", [*base, "{case}/a/b/out"],
                 check=lambda v, fx, f: (f / "a" / "b" / "out" / "config.json").is_file()),
            Case(f"out-{cmd}-full-disk", "outputs", "error", out, inject=_enospc_safetensors),
            Case(f"out-{cmd}-full-disk-over-previous", "outputs", "error", out, setup=previous,
                 inject=_enospc_safetensors, keep=["out/model.safetensors", "out/config.json"]),
            Case(f"out-{cmd}-read-only", "outputs", "error", out, inject=_read_only),
        ]
    file_outputs = {
        "eval-json": ["eval", "{llama}", "--seqlen", "32", "--max-windows", "1", "--json"],
        "trace": ["trace", "{mixtral}", "--seqlen", "32", "--max-windows", "1", "-o"],
        "profile": ["profile", "{mixtral}", "--seqlen", "32", "--max-windows", "1", "-o"],
        "profile-hw": ["profile-hw", "{mixtral}", "--repeats", "1", "-o"],
        "simulate-json": ["simulate", "synthetic-mixtral", "--policies", "lru", "--gpu-budget", "25%", "--json"],
        "run-json": ["run", "{mixtral}", "--max-new-tokens", "2", "--hardware", "rtx4090-pcie4", "--profile",
                     "{trace}", "--threads", "1", "--json"],
    }
    for cmd, base in file_outputs.items():
        res = "res.npz" if cmd in ("trace", "profile") else "res.json"  # the name each command writes
        written = lambda v, fx, f, res=res: (f / "r" / res).is_file() and (f / "r" / res).stat().st_size > 0
        cases += [
            Case(f"file-{cmd}-is-a-folder", "outputs", "error", [*base, "{case}"], keep=[]),
            Case(f"file-{cmd}-missing-parent", "outputs", "ok", [*base, f"{{case}}/r/{res}"], check=written),
            Case(f"file-{cmd}-overwrites-own-file", "outputs", "ok", [*base, f"{{case}}/r/{res}"], check=written,
                 setup=lambda fx, f, res=res: ((f / "r").mkdir(exist_ok=True), (f / "r" / res).write_text("old"))),
            Case(f"file-{cmd}-full-disk", "outputs", "error", [*base, f"{{case}}/r/{res}"], inject=_enospc_fsync,
                 setup=lambda fx, f, res=res: ((f / "r").mkdir(exist_ok=True), (f / "r" / res).write_text("old")),
                 keep=[f"r/{res}"]),
            Case(f"file-{cmd}-read-only", "outputs", "error", [*base, f"{{case}}/r/{res}"], inject=_read_only),
            Case(f"file-{cmd}-under-a-file", "outputs", "error", [*base, f"{{case}}/f/{res}"],
                 setup=lambda fx, f: (f / "f").write_text("a file"), keep=["f"]),
        ]
    return cases


TEXTS = {
    "empty.txt": b"",
    "blank.txt": b"\n\n   \n",
    "binary.txt": bytes(range(256)) * 8,
    "latin1.txt": "caf\xe9 na\xefve r\xe9sum\xe9 ".encode("latin-1") * 50,
    "short.txt": b"Five tokens or so.",
    "wrong-keys.jsonl": b'{"content": "text under another key"}\n' * 20,
    "malformed.jsonl": b'{"text": "ok"}\n{"text": broken\n',
    "not-objects.jsonl": b"[1, 2]\n\"a string\"\n",
    "unknown.xyz": b"some text " * 100,
}


def input_cases() -> list[Case]:
    users = {
        "quantize": ["quantize", "{llama}", "--method", "rtn", "--nsamples", "2", "--seqlen", "32", "-o", "{case}/q",
                     "--calib"],
        "eval": ["eval", "{llama}", "--seqlen", "32", "--max-windows", "1", "--dataset"],
        "trace": ["trace", "{mixtral}", "--seqlen", "32", "--max-windows", "1", "-o", "{case}/t.npz", "--dataset"],
    }
    cases = []
    for cmd, base in users.items():
        for name, data in TEXTS.items():
            def setup(fx, f, name=name, data=data):
                (f / name).write_bytes(data)
            cases.append(Case(f"input-{cmd}-{name}", "inputs", "error", [*base, f"{{case}}/{name}"], setup=setup))
        cases.append(Case(f"input-{cmd}-missing-file", "inputs", "error", [*base, "{case}/nope.txt"]))
        cases.append(Case(f"input-{cmd}-a-folder", "inputs", "error", [*base, "{case}"]))
        cases.append(Case(f"input-{cmd}-unknown-dataset", "inputs", "error", [*base, "wikitext-9"]))
    return cases


def cases() -> list[Case]:
    return checkpoint_cases() + model_cases() + output_cases() + input_cases()
