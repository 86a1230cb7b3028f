"""Corpora as text: resolve a dataset name or path to its files, read them, and record the exact
bytes a result came from (`dataset_identity`). Tokenizing and windows are `haq.data.windows`.

Datasets (`dataset` argument):
  wiki-offline   bundled corpus; eval = test split, calib = train split, each one token stream.
  wikitext2      $HAQ_WIKITEXT2, or a folder holding wiki.{test,train}.raw, {test,train}.txt,
                 {test,train}-*.parquet or a `datasets.save_to_disk` DatasetDict.
  c4, c4-new     $HAQ_C4: a folder holding c4-validation.00000-of-00008.json.gz and
                 c4-train.00000-of-01024.json.gz (a path to such a folder means `c4`).
  FILE.txt       whole file as one stream; FILE.jsonl: the "text" fields joined by a blank line.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

from haq.data import wiki_offline
from haq.errors import HaqError

Kind = Literal["wiki-offline", "wikitext2", "c4", "c4-new", "text", "jsonl"]
Role = Literal["eval", "calib"]
ENV_VARS = {"wikitext2": "HAQ_WIKITEXT2", "c4": "HAQ_C4", "c4-new": "HAQ_C4"}
EXPECTED = "wiki-offline, wikitext2, c4, c4-new, a Wikitext2 or C4 folder, a .txt or a .jsonl file"

# GPTQ's evaluation constants: C4 eval is 256 windows; c4-new joins the first 1100 validation docs.
C4_EVAL_WINDOWS = 256
C4_NEW_DOCS = 1100
C4_SHARDS = {
    "validation": "c4-validation.00000-of-00008.json",
    "train": "c4-train.00000-of-01024.json",
}
WIKITEXT2_EXPECTED = "Wikitext2 files (wiki.test.raw, test.txt, test-*.parquet or a save_to_disk DatasetDict)"
C4_EXPECTED = "C4 shards (c4-validation.00000-of-00008.json.gz, c4-train.00000-of-01024.json.gz)"
WIKITEXT2_LAYOUTS = {  # layout -> the files that mark it (a split's files, or a DatasetDict's index)
    "raw": "wiki.{split}.raw",
    "txt": "{split}.txt",
    "parquet": "{split}-*.parquet",
    "disk": "dataset_dict.json",
}


@dataclass(frozen=True)
class Source:
    """A resolved dataset: which protocol applies (`kind`) and where its files are."""

    name: str = field(compare=False)  # as the user gave it; not part of cache keys
    kind: Kind
    path: Path  # file, or folder holding the split files
    layout: str = ""  # Wikitext2 only: a key of WIKITEXT2_LAYOUTS


# ---------------------------------------------------------------------------------------------
# Resolution


def resolve(dataset: str) -> Source:
    """Map a dataset name or path to a Source, failing early with what was expected."""
    if dataset == "wiki-offline":
        return Source(dataset, "wiki-offline", wiki_offline.corpus_path())
    if dataset in ENV_VARS:
        env = ENV_VARS[dataset]
        value = os.environ.get(env)
        if not value:
            raise HaqError(f"dataset {dataset!r}: set {env} or pass a path")
        path = Path(value).expanduser()
        if dataset == "wikitext2":
            if (wt2 := _wikitext2_dir(path)) is None:
                raise HaqError(f"{env}={path}: expected a folder with {WIKITEXT2_EXPECTED}")
            return Source(dataset, "wikitext2", *wt2)
        if (c4 := _c4_dir(path)) is None:
            raise HaqError(f"{env}={path}: expected a folder with {C4_EXPECTED}")
        return Source(dataset, dataset, c4)  # type: ignore[arg-type]

    path = Path(dataset).expanduser()
    if path.is_dir():
        if (wt2 := _wikitext2_dir(path)) is not None:
            return Source(dataset, "wikitext2", *wt2)
        if (c4 := _c4_dir(path)) is not None:
            return Source(dataset, "c4", c4)
        raise HaqError(f"{path}: folder holds neither {WIKITEXT2_EXPECTED} nor {C4_EXPECTED}")
    if path.is_file():
        if path.suffix == ".txt":
            return Source(dataset, "text", path)
        if path.suffix == ".jsonl":
            return Source(dataset, "jsonl", path)
        raise HaqError(f"{path}: unsupported file type {path.suffix!r}; expected one of: {EXPECTED}")
    raise HaqError(f"dataset {dataset!r}: no such file or folder; expected one of: {EXPECTED}")


def _wikitext2_dir(root: Path) -> tuple[Path, str] | None:
    """(folder, layout) of Wikitext2 under root, also looking one level down as the zip and the
    HF dataset repo nest it."""
    for folder in (root, root / "wikitext-2-raw-v1", root / "wikitext-2-raw"):
        for layout in WIKITEXT2_LAYOUTS:
            if _wikitext2_files(folder, layout, "test") or _wikitext2_files(folder, layout, "train"):
                return folder, layout
    return None


def _wikitext2_files(folder: Path, layout: str, split: str) -> list[Path]:
    if layout == "disk":
        split_dir = folder / split
        if not (folder / "dataset_dict.json").is_file() or not split_dir.is_dir():
            return []
        return sorted(p for p in split_dir.rglob("*") if p.is_file())
    pattern = WIKITEXT2_LAYOUTS[layout].format(split=split)
    files = sorted(p for p in folder.glob(pattern) if p.is_file())
    if layout == "parquet" and not files:  # the hub's parquet-conversion branch: test/0000.parquet
        files = sorted(p for p in (folder / split).glob("*.parquet") if p.is_file())
    return files


def _c4_dir(root: Path) -> Path | None:
    """Folder holding at least one GPTQ C4 shard (root, or root/en as in the allenai/c4 repo)."""
    for folder in (root, root / "en"):
        if any(_c4_shard(folder, split) for split in C4_SHARDS):
            return folder
    return None


def _c4_shard(folder: Path, split: str) -> Path | None:
    for name in (C4_SHARDS[split] + ".gz", C4_SHARDS[split]):
        if (folder / name).is_file():
            return folder / name
    return None


def _files(src: Source) -> list[Path]:
    """The files a source reads, for its identity and for cache invalidation."""
    if src.kind == "wikitext2":
        return [p for split in ("test", "train") for p in _wikitext2_files(src.path, src.layout, split)]
    if src.kind in ("c4", "c4-new"):
        return [p for split in C4_SHARDS if (p := _c4_shard(src.path, split)) is not None]
    return [src.path]


def stamp(src: Source) -> tuple[tuple[str, int, int], ...]:
    """(path, mtime, size) of every file: part of each cache key, so an edited file is re-read."""
    return tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in _files(src))


# ---------------------------------------------------------------------------------------------
# Reading text


def _not_utf8(path: Path, err: UnicodeDecodeError) -> HaqError:
    return HaqError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); expected a UTF-8 file")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from err


def _read_lines(path: Path) -> list[str]:
    """Iterating the file (universal newlines, not str.splitlines) splits lines as HF's script did."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line if line.strip() else "" for line in f]
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from err


def _read_jsonl(path: Path) -> list[str]:
    """The "text" field of every line of a JSON-lines file (gzip if the name ends in .gz)."""
    try:
        return _parse_jsonl(path)
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from err
    except gzip.BadGzipFile as err:
        raise HaqError(f"{path}: not a gzip file ({err}); expected gzipped JSON lines") from err


def _parse_jsonl(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    texts = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise HaqError(f"{path}:{lineno}: not valid JSON ({err.msg}); expected one JSON object per line") from err
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise HaqError(f'{path}:{lineno}: expected a JSON object with a "text" string field')
            texts.append(record["text"])
    return texts


@lru_cache(maxsize=2)
def c4_docs(path: Path, stamp: tuple) -> tuple[str, ...]:
    docs = tuple(_read_jsonl(path))
    if not docs:
        raise HaqError(f'{path}: no documents; expected JSON lines with a "text" field')
    return docs


def _wikitext2_rows(src: Source, split: str) -> list[str]:
    """Rows as the HF `wikitext-2-raw-v1` dataset holds them: one per line of the raw file, newline
    kept, blank lines as "" (the HF loading script's rule), so joining them reproduces GPTQ's text."""
    files = _wikitext2_files(src.path, src.layout, split)
    if not files:
        pattern = WIKITEXT2_LAYOUTS[src.layout].format(split=split)
        if src.layout == "disk":
            pattern = f"a {split!r} split"
        raise HaqError(f"{src.path}: Wikitext2 {split} split not found; expected {pattern}")
    if src.layout in ("raw", "txt"):
        return _read_lines(files[0])
    if src.layout == "parquet":
        return [row for f in files for row in _read_parquet_text(f)]
    return _read_saved_dataset(src.path, split)


def _read_parquet_text(path: Path) -> list[str]:
    if importlib.util.find_spec("pyarrow") is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except pa.ArrowException as err:
            raise HaqError(f"{path}: not a readable parquet file ({err}); expected Wikitext2 parquet") from err
        if "text" not in table.column_names:
            raise HaqError(f"{path}: no 'text' column (has {table.column_names}); expected Wikitext2 parquet")
        return table.column("text").to_pylist()
    if importlib.util.find_spec("pandas") is not None:
        import pandas as pd

        try:
            frame = pd.read_parquet(path)
        except ImportError as err:  # pandas without a parquet engine
            raise HaqError(f"{path}: reading parquet needs pyarrow: pip install pyarrow ({err})") from err
        if "text" not in frame.columns:
            raise HaqError(f"{path}: no 'text' column (has {list(frame.columns)}); expected Wikitext2 parquet")
        return frame["text"].tolist()
    raise HaqError(f"{path}: reading parquet needs pyarrow (or pandas): pip install pyarrow")


def _read_saved_dataset(folder: Path, split: str) -> list[str]:
    if importlib.util.find_spec("datasets") is None:
        raise HaqError(f"{folder}: a save_to_disk dataset needs the `datasets` package: pip install datasets")
    import datasets

    data = datasets.load_from_disk(str(folder))
    if split not in data or "text" not in data[split].column_names:
        raise HaqError(f"{folder}: expected a DatasetDict with a {split!r} split holding a 'text' column")
    return list(data[split]["text"])


def source_text(src: Source, role: Role) -> str:
    """The text one token stream is made of; GPTQ's joins for Wikitext2 and c4-new."""
    if src.kind == "wiki-offline":
        text = wiki_offline.text("test" if role == "eval" else "train")
    elif src.kind == "wikitext2":
        # GPTQ: test rows joined by "\n\n"; train rows joined by " ".
        rows = _wikitext2_rows(src, "test" if role == "eval" else "train")
        text = ("\n\n" if role == "eval" else " ").join(rows)
    elif src.kind == "c4-new":
        text = " ".join(c4_docs(c4_shard_for(src, "validation"), stamp(src))[:C4_NEW_DOCS])
    elif src.kind == "jsonl":
        text = "\n\n".join(_read_jsonl(src.path))
    else:
        text = _read_text(src.path)
    if not text.strip():
        raise HaqError(f"{src.path}: no text; expected a non-empty corpus")
    return text


def c4_shard_for(src: Source, split: str) -> Path:
    shard = _c4_shard(src.path, split)
    if shard is None:
        raise HaqError(f"{src.path}: C4 {split} shard not found; expected {C4_SHARDS[split]}.gz")
    return shard


def dataset_identity(dataset: str) -> dict:
    """What a quantized checkpoint records about its data, so a result can be traced to exact bytes:
    name, kind, resolved path, sha256 and size of the files read. With several files, sha256 is that
    of their `sha256sum`-style listing ("<hash>  <relative path>" lines, sorted by path)."""
    src = resolve(dataset)
    files = _files(src)
    if not files:
        raise HaqError(f"{src.path}: no data files found; expected one of: {EXPECTED}")
    root = src.path if src.path.is_dir() else src.path.parent
    hashes = {p.relative_to(root).as_posix(): _sha256(p, p.stat().st_mtime_ns, p.stat().st_size) for p in files}
    if len(hashes) == 1:
        digest = next(iter(hashes.values()))
    else:
        listing = "".join(f"{h}  {name}\n" for name, h in sorted(hashes.items()))
        digest = hashlib.sha256(listing.encode()).hexdigest()
    return {
        "name": src.name,
        "kind": src.kind,
        "path": str(src.path.resolve()),
        "sha256": digest,
        "bytes": sum(p.stat().st_size for p in files),
        "files": hashes,
    }


@lru_cache(maxsize=16)
def _sha256(path: Path, mtime_ns: int, size: int) -> str:
    """Cached by (mtime, size): the C4 train shard is large and identity is asked once per save."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
