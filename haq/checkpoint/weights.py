"""The one checked reader of weights, shared by haq checkpoints and compressed-tensors exports:
file checksums, and a state-dict load in which every tensor must fit the architecture."""
from __future__ import annotations

import hashlib
from pathlib import Path

from haq.errors import HaqError


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_checked(model, state: dict, config, where) -> None:
    """Load `state` into `model`; every weight must fit (a tied lm_head may be absent, then tied)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise HaqError(f"{where} does not fit the architecture: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if tied:
        model.tie_weights()
