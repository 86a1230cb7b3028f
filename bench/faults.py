"""The fault-injection catalogue (tests/faults), every case run and classified: clear error,
correct result, traceback, hang, silent wrong result (or a valid input refused); and whether a
user's file was lost. Writes bench/results/faults.{json,md}.

    python bench/faults.py [--only SUBSTRING] [--timeout 120]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, machine, md_table, write_results  # noqa: E402

from haq.io import atomic_write_text  # noqa: E402

sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="run the cases whose id contains this")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a case counts as a hang")
    parser.add_argument("--workers", type=int, default=2, help="cases run at once (each on one thread)")
    parser.add_argument("--workdir", help="fixtures and case folders (default: a temp folder)")
    args = parser.parse_args()

    from tests.faults.catalogue import all_cases, build_fixtures
    from tests.faults.runner import OUTCOMES, run_cases

    work = Path(args.workdir or tempfile.mkdtemp(prefix="haq-faults-"))
    start = time.perf_counter()
    fx = build_fixtures(work / "fixtures")
    cases = [c for c in all_cases() if not args.only or args.only in c.id]
    done = []

    def show(result) -> None:
        done.append(result)
        flag = "" if result.ok else f"  <-- {result.outcome}{', data lost' * result.data_lost}" \
                                       f"{', temp left' * result.temp_left}"
        print(f"[{len(done)}/{len(cases)}] {result.case}: {result.outcome} ({result.seconds:.1f}s){flag}", flush=True)

    results = run_cases(cases, fx, work / "cases", args.timeout, workers=args.workers, on_result=show)
    if not args.only or "server" in args.only:
        from tests.faults.server import server_cases

        (work / "server").mkdir(exist_ok=True)
        for result in server_cases(fx.mixtral, work / "server"):
            show(result)
            results.append(result)
    counts = collections.Counter(r.outcome for r in results)
    lost = sum(r.data_lost for r in results)
    summary = {**{o: counts.get(o, 0) for o in OUTCOMES}, "data lost": lost,
               "temp files left": sum(r.temp_left for r in results), "cases": len(results),
               "cli": sum(c.kind == "cli" for c in cases), "api": sum(c.kind == "api" for c in cases),
               "server": sum(r.area == "server" for r in results)}
    by_area = collections.defaultdict(collections.Counter)
    for r in results:
        by_area[r.area][r.outcome] += 1
    area_rows = [{"area": a, "cases": sum(c.values()), **{o: c.get(o, 0) for o in OUTCOMES}}
                 for a, c in sorted(by_area.items())]
    rows = [{"case": r.case, "area": r.area, "call": r.call.replace("|", "\\|")[:110], "expect": r.expect,
             "exit": r.exit_code, "outcome": r.outcome, "data lost": "yes" if r.data_lost else "no",
             "temp left": "yes" if r.temp_left else "no",
             "message": r.message.replace("|", "\\|")[:160]} for r in results]
    load = os.getloadavg()
    head = (f"# Fault injection: {len(results)} cases ({summary['cli']} CLI runs, {summary['api']} Python API calls, "
          f"{summary['server']} against a live `haq serve`)\n\n"
          f"`python bench/faults.py` on {machine()['cpu']}, load average {load[0]:.1f}, "
          f"{time.perf_counter() - start:.0f} s. Each case runs in a forked process ({args.workers} at a time) with a "
          f"{args.timeout:.0f} s limit "
          "(a hang past it is killed and counted); cases are defined in `tests/faults/cases_*.py`, and the same "
          "catalogue runs in `make test` (tests/faults/test_catalogue.py, test_server_cases.py). Outcomes: a clear "
          "error is a non-zero exit whose last line is `haq: error: ...` (or argparse's usage error; for the server a 4xx "
          "with an OpenAI error body); a correct result passed the case's check; data lost means a file the case "
          "put there beforehand changed or vanished; temp left means a haq temp folder stayed behind.\n\n"
          + md_table([summary], list(summary)) + "\n\n## By area\n\n"
          + md_table(area_rows, ["area", "cases", *OUTCOMES]))
    md = head + "\n\n## Every case\n\n" + md_table(rows, list(rows[0])) + "\n"
    atomic_write_text(RESULTS / "faults-summary.md", head)  # what the README quotes
    write_results("faults", {"machine": machine(), "load": load, "summary": summary,
                             "cases": [asdict(r) for r in results]}, md)
    sys.exit(0 if all(r.ok for r in results) else 1)


if __name__ == "__main__":
    main()
