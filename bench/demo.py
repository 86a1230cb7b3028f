"""Time `make demo` as a newcomer runs it: a fresh clone of this repository, an empty HOME (no
model cache, no pip cache), `make setup` and then `make demo`, each timed. Writes
bench/results/demo.{json,md}: {"wall_s": the demo, "setup_s", "steps_s", "ppl", "machine", "load"}.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from common import ROOT, git_rev, machine, md_table, write_results


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="haq-demo-") as tmp:
        clone = Path(tmp) / "haq"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env = {k: v for k, v in os.environ.items() if k not in ("HAQ_HOME", "XDG_CACHE_HOME", "VIRTUAL_ENV")}
        env["HOME"] = tmp
        times, load = {}, []
        steps = Path(tmp) / "steps.json"
        for target, extra in (("setup", []), ("demo", [f"DEMO_ARGS=--json {steps}"])):
            load.append(os.getloadavg()[0])
            start = time.perf_counter()
            subprocess.run(["make", "-s", target, *extra], cwd=clone, env=env, check=True)
            times[target] = time.perf_counter() - start
            print(f"make {target}: {times[target]:.0f}s", flush=True)
        demo = json.loads(steps.read_text())
        rev = git_rev(clone)  # what ran: the clone's commit, not this working tree
    result = {"wall_s": round(times["demo"], 1), "setup_s": round(times["setup"], 1),
              "steps_s": demo["steps_s"], "ppl": demo["ppl"], "machine": machine(), "git": rev,
              "load": round(max(load + [demo["load"]]), 2)}
    rows = [{"step": k, "seconds": v} for k, v in demo["steps_s"].items()]
    md = (f"# `make demo` on a fresh clone ({machine()['cpu']}, git {rev})\n\n"
          f"`python bench/demo.py`: an empty HOME, `make setup` {times['setup']:.0f} s, then `make demo` "
          f"**{times['demo']:.0f} s** (model builds included), load average up to {result['load']}.\n\n"
          + md_table(rows, ["step", "seconds"]) + "\n" + md_table(demo["ppl"], ["model", "weights", "ppl", "tokens"]))
    write_results("demo", result, md)


if __name__ == "__main__":
    main()
