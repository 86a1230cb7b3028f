"""Runs one fault case in a forked child (the parent's imports are shared, its state is not) and
classifies what happened: a clear one-line error, a correct result, a traceback, a hang, or a silent
wrong result; and whether a file the user had was changed or removed (data lost)."""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from tests.faults.catalogue import Case, Fixtures

OUTCOMES = ("clear error", "correct result", "traceback", "hang", "silent wrong result", "refused a valid input")
GOOD = ("clear error", "correct result")


@dataclass
class Result:
    case: str
    area: str
    call: str
    expect: str
    outcome: str
    exit_code: int | None
    message: str  # the last line of stderr (or of the exception)
    data_lost: bool
    temp_left: bool  # a haq temp folder or file left beside an output
    seconds: float

    @property
    def ok(self) -> bool:
        return self.outcome in GOOD and not self.data_lost and not self.temp_left


def _digests(paths: list[Path]) -> dict[str, str | None]:
    out = {}
    for path in paths:
        if path.is_dir():
            out[str(path)] = "dir:" + ",".join(sorted(p.name for p in path.iterdir()))
        elif path.is_file():
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[str(path)] = None
    return out


def _child(case: Case, fx: Fixtures, folder: Path) -> int:
    """In the fork: stdout/stderr to files, the case's injection, then the call."""
    import torch

    torch.set_num_threads(1)
    os.environ["HAQ_HOME"] = str(fx.root / "home")
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(folder / f".{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    # log handlers made earlier in the parent hold the streams of their time (a test's captured
    # stderr, pytest's capture buffers, closed since): a warning would print "--- Logging error ---"
    # with a traceback. The child keeps none of pytest's and points the others at its own stderr.
    logging.getLogger().handlers = []
    for name in list(logging.root.manager.loggerDict):
        for handler in getattr(logging.getLogger(name), "handlers", []):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.stream = sys.stderr  # not setStream: it would flush the closed one
                if "flush" in vars(handler):  # transformers binds its handler's flush to the stderr of its day
                    handler.flush = sys.stderr.flush
    try:
        if case.inject is not None:
            case.inject()
        if case.kind == "cli":
            from haq.cli import main

            code = main(case.argv(fx, folder))
        else:
            from haq.errors import HaqError

            try:
                value = case.call(fx, folder)
            except HaqError as exc:
                print(f"haq: error: {exc}", file=sys.stderr)
                return 2
            if case.check is not None and not case.check(value, fx, folder):
                print("check failed: the call returned a wrong result", file=sys.stderr)
                return 99
            return 0
        if code == 0 and case.check is not None and not case.check(None, fx, folder):
            print("check failed: exit 0 with a wrong result", file=sys.stderr)
            return 99
        return code
    except SystemExit as exc:  # argparse's usage errors
        return exc.code if isinstance(exc.code, int) else 2
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


@dataclass
class _Running:
    case: Case
    folder: Path
    pid: int
    started: float
    before: dict


def _start(case: Case, fx: Fixtures, workdir: Path) -> _Running:
    folder = workdir / case.id
    folder.mkdir(parents=True, exist_ok=True)
    if case.setup is not None:
        case.setup(fx, folder)
    before = _digests([folder / k for k in case.keep])
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = _child(case, fx, folder)
        finally:
            os._exit(code if isinstance(code, int) else 1)
    return _Running(case, folder, pid, started, before)


def _classify(run: _Running, fx: Fixtures, code: int | None, hung: bool) -> Result:
    case, folder = run.case, run.folder
    seconds = time.perf_counter() - run.started
    err = (folder / ".stderr").read_text(errors="replace") if (folder / ".stderr").exists() else ""
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    message = lines[-1].strip() if lines else ""
    usage_error = code == 2 and ": error: " in message  # haq's own, or argparse's "haq run: error: ..."
    if hung:
        outcome = "hang"
    elif "Traceback (most recent call last)" in err or (code not in (0, 2, 99)):
        outcome = "traceback"
    elif code == 99:
        outcome = "silent wrong result"
    elif code == 0:
        outcome = "correct result" if case.expect == "ok" else "silent wrong result"
    elif usage_error:
        outcome = "clear error" if case.expect == "error" else "refused a valid input"
    else:
        outcome = "traceback"
    lost = _digests([folder / k for k in case.keep]) != run.before
    temp_left = any(".tmp-" in p.name for p in folder.rglob(".*"))
    return Result(case.id, case.area, case.describe(fx, folder), case.expect, outcome, code, message[:300],
                  lost, temp_left, seconds)


def run_cases(cases: list[Case], fx: Fixtures, workdir: Path, timeout_s: float = 120.0, workers: int = 2,
              on_result=None) -> list[Result]:
    """All cases, `workers` processes at a time (each child computes on one thread)."""
    pending, running, results = list(cases), [], {}
    while pending or running:
        while pending and len(running) < workers:
            running.append(_start(pending.pop(0), fx, workdir))
        time.sleep(0.005)
        for run in list(running):
            done, status = os.waitpid(run.pid, os.WNOHANG)
            hung = not done and time.perf_counter() - run.started > timeout_s
            if hung:
                os.kill(run.pid, signal.SIGKILL)
                os.waitpid(run.pid, 0)
            if done or hung:
                running.remove(run)
                result = _classify(run, fx, os.waitstatus_to_exitcode(status) if done else None, hung)
                results[run.case.id] = result
                if on_result is not None:
                    on_result(result)
    return [results[c.id] for c in cases]


def run_case(case: Case, fx: Fixtures, workdir: Path, timeout_s: float = 120.0) -> Result:
    return run_cases([case], fx, workdir, timeout_s, workers=1)[0]
