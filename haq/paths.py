"""Where haq keeps what it builds: `HAQ_HOME`, else the user's cache dir."""
from __future__ import annotations

import os
from pathlib import Path


def haq_home() -> Path:
    env = os.environ.get("HAQ_HOME")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "haq"


def models_dir() -> Path:
    return haq_home() / "models"
