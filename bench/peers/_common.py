"""Shared by the peer scripts, which run inside the peers' venvs where haq is not installed: the
windows file, the perplexity loop (a copy of haq/eval/perplexity.py's, so every row is scored the
same way) and the result file. Imports only torch and the standard library."""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
from pathlib import Path

import torch


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--model", required=True, help="float HF model folder")
    p.add_argument("--windows", required=True, help=".pt file with 'calib' and 'eval' LongTensors [n, seqlen]")
    p.add_argument("--result", required=True, help="JSON file this script writes its row to")
    p.add_argument("--save", help="also save the quantized model here")
    return p


def load_windows(path: str) -> dict[str, torch.Tensor]:
    windows = torch.load(path)
    torch.manual_seed(0)
    return windows


@torch.no_grad()
def window_nll(model, window: torch.Tensor) -> tuple[float, int]:
    """Summed NLL (float64) of tokens 1..L-1 of one window given their prefixes (haq's own)."""
    device = next(model.parameters()).device
    ids = window[None].to(device)
    logits = model(ids, use_cache=False).logits[0, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
    return float(nll), ids.shape[1] - 1


def perplexity(model, windows: torch.Tensor) -> dict:
    """PPL = exp(sum NLL / predicted tokens) over independent windows; forward_s is the fastest
    window's forward (one window = seqlen tokens)."""
    nll_sum, count, times = 0.0, 0, []
    for window in windows:
        start = time.perf_counter()
        nll, n = window_nll(model, window)
        times.append(time.perf_counter() - start)
        nll_sum += nll
        count += n
    return {"ppl": math.exp(nll_sum / count), "nll_sum": nll_sum, "tokens": count, "windows": len(windows),
            "seqlen": int(windows.shape[1]), "forward_s": round(min(times), 3)}


def peak_rss_mb() -> int:
    """Peak RSS of this process image: VmHWM, which exec resets. (ru_maxrss is not: on Linux a
    child inherits its parent's peak at fork, so every cell would report at least the driver's.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def write_result(path: str, row: dict) -> None:
    row = {**row, "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads()}
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(row, indent=2) + "\n")
    os.replace(tmp, path)
    print(json.dumps(row))
