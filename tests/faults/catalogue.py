"""The fault catalogue: what a hostile user tries, as data. A case is a CLI command (argv with
{placeholders} for the shared fixtures and the case's own folder) or a Python API call, what it
must give (a clear error, or a result its check verifies), the files that must survive, an optional
setup (copy and corrupt a fixture) and an optional injection run in the case's process (a writer
that fails with ENOSPC, a closed stdout)."""
from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Fixtures:
    """Built once per run: the zoo models, rtn checkpoints, an export, a trace and a hardware file."""
    root: Path
    llama: Path
    mixtral: Path
    gemma: Path
    ckpt: Path  # rtn checkpoint of tiny-mixtral
    ckpt_llama: Path
    export: Path
    trace: Path
    trace_other: Path  # tiny-qwen2-moe's routing: another shape
    hw: Path

    def paths(self) -> dict[str, str]:
        return {k: str(v) for k, v in vars(self).items()}


@dataclass
class Case:
    id: str
    area: str
    expect: str  # "error" or "ok"
    args: list[str] | None = None  # CLI argv template
    call: Callable | None = None  # API: call(fixtures, folder) -> value
    setup: Callable[[Fixtures, Path], None] | None = None
    check: Callable | None = None  # check(value or None, fixtures, folder) -> bool
    inject: Callable[[], None] | None = None
    keep: list[str] = field(default_factory=list)  # files (relative to the case folder) that must survive
    note: str = ""

    @property
    def kind(self) -> str:
        return "cli" if self.args is not None else "api"

    def argv(self, fx: Fixtures, folder: Path) -> list[str]:
        return [a.format(case=folder, **fx.paths()) for a in self.args]

    def describe(self, fx: Fixtures, folder: Path) -> str:
        if self.args is None:
            return self.note
        rel = {**{k: Path(v).name for k, v in fx.paths().items()}, "case": "CASE"}
        return "haq " + " ".join(a.format(**rel) if "{" in a else a for a in self.args)


def build_fixtures(root: Path) -> Fixtures:
    """Everything the cases share, written under root (which becomes HAQ_HOME for the zoo)."""
    import os

    previous = os.environ.get("HAQ_HOME")
    os.environ["HAQ_HOME"] = str(root / "home")  # the zoo builds here; restored below
    try:
        return _build(root)
    finally:
        if previous is None:
            os.environ.pop("HAQ_HOME")
        else:
            os.environ["HAQ_HOME"] = previous


def _build(root: Path) -> Fixtures:
    from haq import api, zoo
    from haq.checkpoint.compressed_tensors import export_checkpoint
    from haq.data.windows import eval_windows
    from haq.loading import load_model
    from haq.quant.recipe import Recipe
    from haq.runtime.hardware import load_profile
    from haq.runtime.record import record_trace
    from haq.runtime.trace import save_trace

    llama, mixtral, gemma = (zoo.build(n) for n in ("tiny-llama", "tiny-mixtral", "tiny-gemma3"))
    ckpt = root / "ckpt"
    if not (ckpt / "haq_config.json").is_file():
        api.quantize(str(mixtral), Recipe(method="rtn"), ckpt, nsamples=2, seqlen=32, progress=False)
    ckpt_llama = root / "ckpt-llama"
    if not (ckpt_llama / "haq_config.json").is_file():
        api.quantize(str(llama), Recipe(method="rtn"), ckpt_llama, nsamples=2, seqlen=32, progress=False)
    export = root / "export"
    if not export.is_dir():
        export_checkpoint(ckpt_llama, export)
    traces = {}
    for name, ref in (("trace.npz", mixtral), ("trace-qwen2.npz", zoo.build("tiny-qwen2-moe"))):
        traces[name] = root / name
        if not traces[name].is_file():
            model, tokenizer, _ = load_model(ref)
            windows = eval_windows("wiki-offline", tokenizer, seqlen=64, max_windows=2)
            save_trace(traces[name], record_trace(model, windows, Path(ref).name, source="faults", progress=False))
    hw = root / "hw.json"
    load_profile("rtx4090-pcie4").save(hw)
    return Fixtures(root, llama, mixtral, gemma, ckpt, ckpt_llama, export, traces["trace.npz"],
                    traces["trace-qwen2.npz"], hw)


def copy_of(attr: str, name: str = "m"):
    """Setup: a private copy of a fixture folder or file, as CASE/name."""
    def setup(fx: Fixtures, folder: Path) -> None:
        src, dst = getattr(fx, attr), folder / name
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    return setup


def then(*steps):
    def setup(fx: Fixtures, folder: Path) -> None:
        for step in steps:
            step(fx, folder)
    return setup


def all_cases() -> list[Case]:
    from tests.faults import cases_args, cases_files

    cases = cases_files.cases() + cases_args.cases()
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return cases
