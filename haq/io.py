"""Atomic writes: a temp file (or folder) beside the target, renamed over it when complete."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def check_output_dir(out: Path, marker: str | None, what: str, own: tuple[str, ...] = ()) -> None:
    """Before any work: `out` must be a folder we may replace (absent, empty, or holding `marker`,
    the file only our own output has, and nothing but names starting with `own`) whose parent is
    writable; a clear error otherwise."""
    from haq.errors import HaqError

    if out.exists() and not out.is_dir():
        raise HaqError(f"{out} is a file, not a folder: choose another output folder for the {what}")
    if out.is_dir() and any(out.iterdir()) and (marker is None or not (out / marker).is_file()):
        raise HaqError(f"{out} exists and is not a {what}: refusing to overwrite it; choose an empty or new folder")
    foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(own)) if out.is_dir() and own else []
    if foreign:
        raise HaqError(f"{out} also holds {', '.join(foreign[:5])}, which replacing it would delete: "
                       f"move them or choose another output folder")
    parent = out.parent if out.parent != Path("") else Path(".")
    existing = next((p for p in [parent, *parent.parents] if p.exists()), Path("/"))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise HaqError(f"cannot write the {what} under {existing}: it is not writable")


def check_output_file(path: Path, option: str) -> None:
    """Before any work: `path` can be written as a file (not a folder; its folder writable)."""
    from haq.errors import HaqError

    if path.is_dir():
        raise HaqError(f"{option} {path} is a folder: give a file path")
    existing = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("/"))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise HaqError(f"{option} {path}: cannot write under {existing}")


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp folder beside `final`; when the block succeeds it replaces `final`, and
    when it fails it is removed, so `final` is never left half-written. A `final` holding files
    the new folder does not (a user's notes, a sub-folder) is not replaced: that would delete them."""
    from haq.errors import HaqError

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            foreign = sorted({p.name for p in final.iterdir()} - {p.name for p in tmp.iterdir()})
            if foreign:
                raise HaqError(f"{final} also holds {', '.join(foreign[:5])}, which replacing it would delete: "
                               f"move them or choose another output folder")
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
