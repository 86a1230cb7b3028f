"""Atomic writes: a temp file (or folder) beside the target, renamed over it when complete."""
from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

TEMP_TAG = ".tmp-"  # temp files and folders: .NAME.tmp-PID-RANDOM beside NAME


def write_failure(target: Path, exc: OSError):
    """A failed write as a one-line HaqError that says what to do (a full disk, a read-only place)."""
    from haq.errors import HaqError

    hint = {errno.ENOSPC: "free some space or choose another output folder",
            errno.EDQUOT: "free some space or choose another output folder",
            errno.EROFS: "the file system is read-only: choose a writable output folder",
            errno.EACCES: "permission denied: choose a writable output folder",
            errno.EPERM: "permission denied: choose a writable output folder"}.get(exc.errno, "check the output path")
    return HaqError(f"cannot write {target}: {exc.strerror or exc}; {hint} (nothing was replaced)")


def _temp_name(final: Path) -> Path:
    """A fresh name beside `final` for its temp file or folder, tagged with this process's id."""
    return final.parent / f".{final.name}{TEMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_with(path, lambda handle: handle.write(data))


def atomic_write_with(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(handle)` into a temp file beside `path`, synced, then renamed over it (a large
    payload is streamed by `write`, never held whole in memory)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_name(path)
        # mode 0o666 under the umask: a result file as readable as any other (mkstemp would give 0600)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_failure(path, exc) from None
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


def _remove_stale_temps(final: Path) -> None:
    """Temp folders of earlier writes of `final` whose process is gone (a kill -9 mid-save): they
    are haq's own, half-written, and would otherwise stay forever."""
    for stale in final.parent.glob(f".{final.name}{TEMP_TAG}*"):
        try:
            pid = int(stale.name[len(final.name) + 1 + len(TEMP_TAG):].split("-")[0])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass  # another user's live process


def _readable_like_any_file(folder: Path) -> None:
    """Mode 0o666 under the umask for the files a writer made private: safetensors' writer creates
    its files 0600, so a checkpoint would be unreadable to the group a shared model folder serves."""
    mask = os.umask(0)
    os.umask(mask)
    for file in folder.rglob("*"):
        if file.is_file() and not file.is_symlink():
            file.chmod(0o666 & ~mask)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp folder beside `final`; when the block succeeds it replaces `final`, and
    when it fails it is removed, so `final` is never left half-written. A `final` holding files
    the new folder does not (a user's notes, a sub-folder) is not replaced: that would delete them.
    A write that fails for lack of space or permission is a HaqError; `final` is left as it was."""
    from haq.errors import HaqError

    tmp = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(final)
        tmp = _temp_name(final)
        tmp.mkdir(mode=0o777)  # under the umask: readable like any folder the user makes (mkdtemp: 0700)
        yield tmp
        _readable_like_any_file(tmp)
        if final.exists():
            foreign = sorted({p.name for p in final.iterdir()} - {p.name for p in tmp.iterdir()})
            if foreign:
                raise HaqError(f"{final} also holds {', '.join(foreign[:5])}, which replacing it would delete: "
                               f"move them or choose another output folder")
            shutil.rmtree(final)
        tmp.rename(final)
    except OSError as exc:
        raise write_failure(final, exc) from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
