"""Copy benchmark tables from bench/results/*.md into README.md, between markers

    <!-- results:NAME -->
    ...
    <!-- /results:NAME -->

so that every number the README quotes is the one a bench script wrote. Run after a benchmark.
"""
from __future__ import annotations

import re
import sys

from common import RESULTS, ROOT

from haq.io import atomic_write_text

README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w.-]+) -->\n).*?(<!-- /results:(?P=name) -->)", re.S)


def body(name: str) -> str:
    """The results file without its top-level title (the README section has its own heading)."""
    text = (RESULTS / f"{name}.md").read_text()
    lines = text.splitlines()
    if lines and lines[0].startswith("# "):
        lines[0] = f"*{lines[0][2:]}* (`bench/results/{name}.md`)"
    return "\n".join("##" + line if line.startswith("##") else line for line in lines).strip() + "\n"


def main() -> None:
    text = README.read_text()
    missing = [m["name"] for m in BLOCK.finditer(text) if not (RESULTS / f"{m['name']}.md").exists()]
    if missing:
        sys.exit(f"no results for {missing} under {RESULTS}")
    new = BLOCK.sub(lambda m: m.group(1) + body(m["name"]) + m.group(3), text)
    atomic_write_text(README, new)
    print(f"README: {len(BLOCK.findall(text))} results blocks refreshed")


if __name__ == "__main__":
    main()
