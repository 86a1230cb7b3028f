"""Crash safety: a real `haq quantize` process killed (SIGKILL or SIGTERM) at a point of its run,
then run again to the end; the result must equal an uninterrupted run's, logit for logit, and what
the kill left must never pass for a checkpoint."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

KILL_POINTS = ("first layer done", "three layers done", "final save started")


@dataclass
class CrashResult:
    point: str
    signal: str
    killed: bool  # False: the run finished before the point was seen
    leftover_refused: bool  # every folder the kill left is refused as a checkpoint
    max_abs_logit_diff: float
    leftovers_after_rerun: list[str]


def write_calibration_text(path: Path) -> Path:
    """A small calibration text: tokenizing it costs nothing, so the runs are about quantization."""
    import random

    rng = random.Random(0)
    words = "the of and to in history science river city music art war king people world".split()
    path.write_text(" ".join(rng.choice(words) for _ in range(3000)))
    return path


def quantize_cmd(model: Path, out: Path, calib: Path, method: str = "rtn") -> list[str]:
    return [sys.executable, "-m", "haq.cli", "quantize", str(model), "--method", method, "--nsamples", "4",
            "--seqlen", "64", "--calib", str(calib), "-o", str(out)]


def _point_reached(out: Path, point: str) -> bool:
    partial = out.parent / f".{out.name}.partial"
    if point == "final save started":
        return any(p.is_dir() for p in out.parent.glob(f".{out.name}.tmp-*"))
    done = len(list(partial.glob("*/layer_*.json"))) if partial.is_dir() else 0
    return done >= (1 if point == "first layer done" else 3)


def _refused(folder: Path) -> bool:
    from haq.errors import HaqError
    from haq.loading import load_model

    try:
        load_model(folder)
    except HaqError:
        return True
    return False


def logits(folder: Path) -> torch.Tensor:
    from haq.checkpoint.native import load_quantized

    ids = torch.arange(1, 33)[None] % 1000
    with torch.no_grad():
        return load_quantized(folder)(ids).logits


def crash_and_resume(model: Path, out: Path, calib: Path, point: str, sig: int, reference: torch.Tensor,
                     method: str = "rtn") -> CrashResult:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(quantize_cmd(model, out, calib, method), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = False
    while proc.poll() is None:
        if _point_reached(out, point):
            proc.send_signal(sig)
            killed = True
            break
        time.sleep(0.002)
    proc.wait()
    left = [p for p in out.parent.iterdir() if p.name.startswith((out.name, f".{out.name}"))]
    refused = all(_refused(p) for p in left if p.is_dir() and (p / "config.json").is_file()) if killed else True
    subprocess.run(quantize_cmd(model, out, calib, method), env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    diff = float((logits(out) - reference).abs().max())
    after = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}"))
    return CrashResult(point, signal.Signals(sig).name, killed, refused, diff, after)
