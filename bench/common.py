"""Shared by the bench scripts: where results go and how they are written."""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

from haq.io import atomic_write_text  # noqa: E402


def machine() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": cpu_name(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def gpu_slug(name: str) -> str:
    """A results-file tag for a GPU name: "NVIDIA H100 80GB HBM3" -> "h100" (its first model-like word)."""
    import re

    found = re.search(r"\b(RTX\s?\d{4}|[A-Z]{1,3}\d{1,4}[A-Z]?)\b", name)
    return found.group(1).lower().replace(" ", "") if found else "gpu"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo ("x86_64" says little about speed)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_results(name: str, payload: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / f"{name}.json", json.dumps(payload, indent=2) + "\n")
    atomic_write_text(RESULTS / f"{name}.md", markdown)
    print(markdown)
    print(f"wrote {RESULTS / name}.json and .md")


def md_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A markdown table; without `columns`, every key of the rows in first-seen order (a row
    missing a key, e.g. a failed one with an error instead, gets an empty cell)."""
    columns = columns or list(dict.fromkeys(c for r in rows for c in r))

    def fmt(v):
        return f"{v:.6g}" if isinstance(v, float) else str(v)  # 6 digits: ppl 226.441 vs 226.506 must differ

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def peak_rss_mb() -> int:
    """This process's own peak RSS (VmHWM). Not getrusage's ru_maxrss: that survives fork and exec,
    so a benchmark cell would report at least the peak of the parent that launched it."""
    import resource

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def git_rev(repo: Path = ROOT) -> str:
    """The short commit the results came from (with '+dirty' for uncommitted changes)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    return rev + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def failure(error: Exception) -> dict:
    """What a benchmark part that failed records in place of its numbers (the other parts still run)."""
    return {"error": f"{type(error).__name__}: {error}"[:300]}
